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
