"""--pretrained: torchvision's own weights through its own loading, from the torch hub
cache; absent and offline, exit 2 in one line within seconds (tests never download)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torchvision

from prefast.errors import ConfigError
from prefast.models import build_model


def test_weights_in_torch_home_are_loaded_and_the_classifier_replaced(tmp_path, monkeypatch,
                                                                     caplog):  # fmt: skip
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(5)  # stands in for ImageNet weights: the file torchvision looks for
    saved = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(saved, checkpoints / "resnet18-f37072fd.pth")
    m = build_model("torchvision:resnet18", in_channels=3, num_classes=10, image_size=32,
                    pretrained=True)  # fmt: skip
    assert torch.equal(m.stages[1].conv1.weight, saved["layer1.0.conv1.weight"])
    assert m.stages[-1][-1].weight.shape == (10, 512)
    assert "--pretrained: classifier fc replaced for the dataset's classes" in caplog.text


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_a_vit_built_at_another_size_resamples_its_position_embedding(tmp_path, caplog):
    torch.manual_seed(6)
    saved = torchvision.models.vit_b_32(image_size=224).state_dict()  # 7x7 patches + 1
    torch.save(saved, tmp_path / "vit.pt")
    m = build_model("torchvision:vit_b_32", in_channels=3, num_classes=10, image_size=64,
                    weights=str(tmp_path / "vit.pt"))  # fmt: skip
    assert m.stages[0].pos_embedding.shape == (1, 1 + 4, 768)
    assert "resampled from 50 to 5 positions for 64 px images" in caplog.text
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.slow  # a subprocess
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_offline_without_the_file_exits_2_in_one_line_within_seconds(tmp_path):
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {probe.stderr.decode().strip()}")
    env = {**os.environ, "TORCH_HOME": str(tmp_path)}
    start = time.monotonic()
    res = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "prefast.cli.main", "train", "--dataset",
         "digits", "--model", "torchvision:resnet18", "--pretrained", "--device", "cpu"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    file = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == (
        f"prefast: error: --pretrained torchvision:resnet18: {file} is not there and "
        "https://download.pytorch.org/models/resnet18-f37072fd.pth cannot be reached "
        f"(offline?): download it elsewhere and put it at {file} (or set TORCH_HOME), or "
        "pass --weights PATH"
    )
    assert elapsed < 30, elapsed  # the interpreter and torch start; no network wait


def _put_in_hf_cache(cache, repo: str, state: dict, filename: str = "model.safetensors") -> None:
    """The layout huggingface_hub leaves after a download: refs/main names a snapshot."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / filename))


def test_timm_weights_in_the_hugging_face_cache_are_loaded_through_timm(tmp_path, monkeypatch,
                                                                       caplog):  # fmt: skip
    timm = pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never download
    torch.manual_seed(7)  # stands in for timm's ImageNet weights, at 224 px
    saved = timm.create_model("vit_tiny_patch16_224", num_classes=1000).state_dict()
    _put_in_hf_cache(tmp_path, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", saved)
    m = build_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=10, image_size=32,
                    pretrained=True)  # fmt: skip
    block = m.stages[3]  # stage 0 is the patch embedding: stage k is block k-1
    assert torch.equal(block.attn.qkv.weight, saved["blocks.2.attn.qkv.weight"])
    assert m.stages[0].rest.pos_embed.shape == (1, 1 + 4, 192)  # resampled by timm from 14x14
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert "--pretrained: classifier head replaced for the dataset's classes" in caplog.text


def test_timm_weights_offline_and_absent_name_the_repo_and_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as err:
        build_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=10, image_size=32,
                    pretrained=True)  # fmt: skip
    assert str(err.value) == (
        "--pretrained timm:vit_tiny_patch16_224: timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k "
        f"is not in the Hugging Face cache {tmp_path} and HF_HUB_OFFLINE is set (unset it to "
        "let timm download it): run `hf download timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k`"
        " where there is a network and copy that cache here (or set HF_HUB_CACHE), or pass "
        "--weights PATH"
    )


def test_the_hugging_face_cache_is_found_where_huggingface_hub_looks(monkeypatch):
    from prefast.models.hub import hf_hub_cache

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", "/h")
    assert hf_hub_cache() == "/h/.cache/huggingface/hub"
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert hf_hub_cache() == "/xdg/huggingface/hub"
    monkeypatch.setenv("HF_HOME", "/hf")
    assert hf_hub_cache() == "/hf/hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", "/old")
    assert hf_hub_cache() == "/old"
    monkeypatch.setenv("HF_HUB_CACHE", "/new")
    assert hf_hub_cache() == "/new"


def test_a_timm_vit_built_at_another_size_resamples_its_position_embedding(tmp_path, caplog):
    timm = pytest.importorskip("timm")
    torch.manual_seed(8)
    saved = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10).state_dict()
    torch.save(saved, tmp_path / "vit.pt")  # a 4x4 grid; the model below has 2x2
    m = build_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=10, image_size=32,
                    weights=str(tmp_path / "vit.pt"))  # fmt: skip
    assert m.stages[0].rest.pos_embed.shape == (1, 1 + 4, 192)
    assert "pos_embed resampled from 17 to 5 positions for 32 px images" in caplog.text
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.slow  # a subprocess
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_timm_offline_without_the_file_exits_2_in_one_line_within_seconds(tmp_path):
    pytest.importorskip("timm")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace here: {probe.stderr.decode().strip()}")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_HUB_CACHE"] = str(tmp_path)  # the network is what is missing, not a setting
    start = time.monotonic()
    res = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "prefast.cli.main", "train", "--dataset",
         "digits", "--model", "timm:vit_tiny_patch16_224", "--pretrained", "--device", "cpu"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "huggingface.co cannot be reached (offline?)" in lines[0], lines
    assert elapsed < 30, elapsed


def test_the_online_probe_is_bounded_when_name_resolution_hangs(monkeypatch):
    """``getaddrinfo`` has no timeout of its own: the probe stops waiting for it."""
    import socket

    from prefast.models.hub import online

    def resolve(*args, **kwargs):  # a resolver that answers after 8 s: too late
        time.sleep(8)
        raise socket.gaierror("no answer")

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    start = time.monotonic()
    assert online("pypi.example", seconds=1.0) is False
    assert time.monotonic() - start < 3, time.monotonic() - start


@contextlib.contextmanager
def stalled_server(head: bool = False):
    """A local HTTP server whose GET sends nothing, ever (and whose HEAD, when ``head``,
    answers as the Hugging Face hub does for a file of 1,000 bytes). Yields its URL."""
    import http.server
    import threading

    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            for key, value in (("ETag", '"e"'), ("X-Repo-Commit", "1" * 40),
                               ("Content-Length", "1000")):  # fmt: skip
                self.send_header(key, value)
            self.end_headers()

        def do_GET(self):  # noqa: N802
            release.wait(120)

        def log_message(self, *args):
            pass

    if not head:
        del Handler.do_HEAD
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_a_stalled_torchvision_download_stops_in_one_line(tmp_path, monkeypatch):
    """torchvision downloads through urllib, which sets no timeout: a server that stops
    sending is given up on after the stall bound, in one line."""
    from helpers import run_with_deadline

    from prefast.models import hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "DOWNLOAD_STALL_SECONDS", 1.0)
    with stalled_server() as server:
        file_url = f"{server}/resnet18-f37072fd.pth"

        class Weights:  # torchvision's WeightsEnum.get_state_dict, at a local URL
            url = file_url

            def get_state_dict(self, *args, **kwargs):
                return torch.hub.load_state_dict_from_url(self.url, *args, **kwargs)

        monkeypatch.setattr(torchvision.models, "get_model_weights",
                            lambda name: type("W", (), {"DEFAULT": Weights()}))  # fmt: skip

        def build():
            with pytest.raises(ConfigError) as err:
                build_model("torchvision:resnet18", in_channels=3, num_classes=10,
                            image_size=32, pretrained=True)  # fmt: skip
            return str(err.value)

        message = run_with_deadline(build, 30)
    assert message.startswith(
        f"--pretrained torchvision:resnet18: the download of {file_url} failed "
    )
    assert "the server stopped sending" in message and "\n" not in message


@pytest.mark.slow  # a subprocess, and huggingface_hub's own retries
def test_a_stalled_hugging_face_download_is_bounded_by_huggingface_hub(tmp_path):
    """huggingface_hub gives each read HF_HUB_DOWNLOAD_TIMEOUT (10 s by default; 1 s here)
    and retries a few times: timm's download ends, and the run exits 2 in one line."""
    pytest.importorskip("timm")
    with stalled_server(head=True) as url:
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        env.update(HF_ENDPOINT=url, HF_HUB_CACHE=str(tmp_path), HF_HUB_DOWNLOAD_TIMEOUT="1",
                   HF_HUB_ETAG_TIMEOUT="1")  # fmt: skip
        start = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "prefast.cli.main", "train", "--dataset", "digits",
             "--model", "timm:resnet18", "--pretrained", "--device", "cpu"],
            capture_output=True, text=True, timeout=240, env=env,
        )  # fmt: skip
        elapsed = time.monotonic() - start
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "prefast: error: --pretrained timm:resnet18: the download of timm/resnet18.a1_in1k "
        "failed (ReadTimeout: timed out; the server stopped sending): try again, or download "
        "it elsewhere and pass --weights PATH"
    ]
    assert elapsed < 120, elapsed


def test_timm_finds_the_files_timm_itself_loads_open_clip_ones_too(tmp_path, monkeypatch):
    """timm loads a tag whose file is open_clip's from ``open_clip_model.safetensors``
    first (its safetensors alternative), then ``open_clip_pytorch_model.bin``; found in the
    cache, offline, it is loaded through timm."""
    timm = pytest.importorskip("timm")
    from timm.models._registry import _model_pretrained_cfgs

    from prefast.models.hub import timm_pretrained_file, timm_weight_source

    cfg = _model_pretrained_cfgs["resnet18.a1_in1k"]  # timm's registry: a tag as open_clip's
    monkeypatch.setattr(cfg, "hf_hub_filename", "open_clip_pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert timm_weight_source("resnet18.a1_in1k") == (
        "hf-hub", "timm/resnet18.a1_in1k",
        ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
    )  # fmt: skip
    torch.manual_seed(11)
    saved = timm.create_model("resnet18", num_classes=1000).state_dict()
    _put_in_hf_cache(tmp_path, "timm/resnet18.a1_in1k", saved, "open_clip_model.safetensors")
    assert timm_pretrained_file("resnet18.a1_in1k").endswith("open_clip_model.safetensors")
    m = build_model("timm:resnet18.a1_in1k", in_channels=3, num_classes=10, image_size=32,
                    pretrained=True)  # fmt: skip
    assert torch.equal(m.stages[1].conv1.weight, saved["layer1.0.conv1.weight"])


def test_timm_weights_published_by_url_are_found_in_the_torch_hub_cache(tmp_path, monkeypatch):
    """A few timm tags have no Hugging Face repo, only a URL: timm loads them from the torch
    hub cache, and so they are found there (offline too)."""
    timm = pytest.importorskip("timm")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(12)
    saved = timm.create_model("legacy_seresnet18", num_classes=1000).state_dict()
    torch.save(saved, checkpoints / "seresnet18-4bb0ce65.pth")
    m = build_model("timm:legacy_seresnet18", in_channels=3, num_classes=10, image_size=32,
                    pretrained=True)  # fmt: skip
    loaded = dict(m.named_parameters())
    assert any(torch.equal(v, saved["layer1.0.conv1.weight"]) for v in loaded.values())
