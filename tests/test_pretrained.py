"""--pretrained: torchvision's own weights through its own loading, from the torch hub
cache; absent and offline, exit 2 in one line within seconds (tests never download)."""

from __future__ import annotations

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


def _put_in_hf_cache(cache, repo: str, state: dict) -> None:
    """The layout huggingface_hub leaves after a download: refs/main names a snapshot."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))


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
    from prefast.models.library import hf_hub_cache

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
