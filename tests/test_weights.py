"""--weights PATH: every checkpoint layout loads, the classifier is replaced for the
dataset's classes (and the log says so), a file that does not fit exits 2 in one line."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torchvision
from helpers import cli_in_process

from prefast.errors import ConfigError
from prefast.models import build_model

RUN = ["train", "--mode", "baseline", "--dataset", "digits", "--epochs", "1", "--device", "cpu"]


def imagenet_resnet18() -> dict[str, torch.Tensor]:
    """A stand-in for a pretrained file: torchvision's resnet18 with 1,000 classes."""
    torch.manual_seed(1)
    return torchvision.models.resnet18(num_classes=1000).state_dict()


@pytest.mark.parametrize(
    "layout",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {}, "args": __import__("argparse").Namespace(lr=0.1)},
        lambda sd: {"model_state_dict": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},  # saved from DDP
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}},  # Lightning
    ],
    ids=["bare", "state_dict", "model-with-args", "model_state_dict", "ddp", "lightning"],
)
def test_each_layout_loads_and_the_classifier_is_replaced(tmp_path, layout, caplog):
    file = tmp_path / "w.pt"
    saved = imagenet_resnet18()
    torch.save(layout(saved), file)
    m = build_model("torchvision:resnet18", in_channels=3, num_classes=10, image_size=32,
                    weights=str(file))  # fmt: skip
    assert torch.equal(m.stages[0][0].weight, saved["conv1.weight"])  # the stem's conv
    assert torch.equal(m.stages[8].conv2.weight, saved["layer4.1.conv2.weight"])
    assert m.stages[-1][-1].weight.shape == (10, 512)  # a new classifier for 10 classes
    assert "classifier fc replaced for the dataset's classes (the file's has another shape)" \
        in caplog.text  # fmt: skip


def test_a_backbone_saved_without_its_classifier_loads_and_the_log_says_so(tmp_path, caplog):
    saved = {k: v for k, v in imagenet_resnet18().items() if not k.startswith("fc.")}
    torch.save(saved, tmp_path / "backbone.pt")
    m = build_model("torchvision:resnet18", in_channels=3, num_classes=10, image_size=32,
                    weights=str(tmp_path / "backbone.pt"))  # fmt: skip
    assert torch.equal(m.stages[8].conv2.weight, saved["layer4.1.conv2.weight"])
    assert "classifier fc replaced for the dataset's classes (the file has none)" in caplog.text


def test_a_file_with_the_datasets_classes_loads_whole_and_one_channel_sums_rgb(tmp_path, caplog):
    torch.manual_seed(2)
    saved = torchvision.models.efficientnet_b0(num_classes=10).state_dict()
    torch.save(saved, tmp_path / "w.pt")
    m = build_model("torchvision:efficientnet_b0", in_channels=1, num_classes=10, image_size=32,
                    weights=str(tmp_path / "w.pt"))  # fmt: skip
    assert torch.equal(m.stages[-1].rest.classifier[1].weight, saved["classifier.1.weight"])
    first = saved["features.0.0.weight"]
    assert torch.equal(m.stages[0][0].weight, first.sum(dim=1, keepdim=True))
    assert "summed over its 3 input channels" in caplog.text and "replaced" not in caplog.text


def test_a_built_in_model_loads_its_own_state_dict(tmp_path):
    torch.manual_seed(3)
    m = build_model("densenet-bc", in_channels=1, num_classes=10, image_size=8, depth=10)
    torch.save({"model": m.state_dict()}, tmp_path / "w.pt")
    torch.manual_seed(4)
    again = build_model("densenet-bc", in_channels=1, num_classes=10, image_size=8, depth=10,
                        weights=str(tmp_path / "w.pt"))  # fmt: skip
    mine, loaded = m.state_dict(), again.state_dict()
    assert mine.keys() == loaded.keys() and all(torch.equal(mine[k], loaded[k]) for k in mine)


def test_a_file_that_does_not_fit_exits_2_naming_the_first_key(tmp_path, capsys, caplog):
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), tmp_path / "r34.pt")
    res = cli_in_process(capsys, caplog, *RUN, "--model", "torchvision:resnet18",
                         "--weights", str(tmp_path / "r34.pt"))  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"prefast: error: --weights {tmp_path / 'r34.pt'} does not fit --model: the first key "
        "that differs is 'layer1.2.conv1.weight' (only the file has it): pass weights saved "
        "from --model's architecture, or the --model they were saved from"
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"not a torch file", "cannot be read as weights"),
        ({"epoch": 3}, "holds no state dict"),
    ],
)
def test_a_weights_file_that_is_not_one_is_refused(tmp_path, content, message):
    file = tmp_path / "w.pt"
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        torch.save(content, file)
    with pytest.raises(ConfigError, match=message) as err:
        build_model("torchvision:resnet18", in_channels=3, num_classes=10, image_size=32,
                    weights=str(file))  # fmt: skip
    assert "\n" not in str(err.value)


def test_a_file_without_num_batches_tracked_loads_as_pytorch_loads_it(tmp_path, caplog):
    """Saved by PyTorch before 0.4.1: BatchNorm keeps the model's own count."""
    saved = imagenet_resnet18()
    old = {k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")
    caplog.set_level(logging.INFO)
    m = build_model("torchvision:resnet18", in_channels=3, num_classes=10, image_size=32,
                    weights=str(tmp_path / "old.pt"))  # fmt: skip
    assert torch.equal(m.stages[0][1].running_var, saved["bn1.running_var"])
    assert int(m.stages[0][1].num_batches_tracked) == 0
    assert "the file has no num_batches_tracked for 20 BatchNorm layers" in caplog.text


def test_torchvisions_own_densenet_checkpoint_names_load(tmp_path):
    """torchvision's DenseNet files name ``denselayer1.norm.1.weight`` what the model calls
    ``denselayer1.norm1.weight``; torchvision renames them when it loads them, so do we."""
    torch.manual_seed(9)
    saved = torchvision.models.densenet121(num_classes=10).state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
           for k, v in saved.items() if not k.endswith("num_batches_tracked")}  # fmt: skip
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "densenet.pth")
    m = build_model("torchvision:densenet121", in_channels=3, num_classes=10, image_size=32,
                    weights=str(tmp_path / "densenet.pth"))  # fmt: skip
    block = m.stages[1]  # stage 0 is the stem up to its pooling
    assert torch.equal(block.denselayer1.norm1.weight,
                       saved["features.denseblock1.denselayer1.norm1.weight"])  # fmt: skip


def test_both_heads_of_a_distilled_deit_are_its_classifier(tmp_path, caplog):
    """timm names a distilled DeiT's two heads (``head``, ``head_dist``): a file with
    ImageNet's classes loads with both replaced, the rest of it exactly."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(10)
    saved = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32).state_dict()
    torch.save(saved, tmp_path / "deit.pt")
    m = build_model("timm:deit_tiny_distilled_patch16_224", in_channels=3, num_classes=10,
                    image_size=32, weights=str(tmp_path / "deit.pt"))  # fmt: skip
    assert torch.equal(m.stages[2].attn.qkv.weight, saved["blocks.1.attn.qkv.weight"])
    assert "classifier head, head_dist replaced for the dataset's classes" in caplog.text


def test_the_log_says_which_entry_of_the_file_and_how_many_tensors_it_loaded(tmp_path, caplog):
    torch.save({"state_dict": imagenet_resnet18(), "epoch": 3}, tmp_path / "w.pt")
    caplog.set_level(logging.INFO)
    build_model("torchvision:resnet18", in_channels=3, num_classes=10, image_size=32,
                weights=str(tmp_path / "w.pt"))  # fmt: skip
    said = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert said == [
        f"--weights {tmp_path / 'w.pt'}: loaded 120 tensors from the file's 'state_dict' entry "
        "(the model has 122)"
    ]
