"""Model inputs at their edges (issue 44): each either works or exits 2 with one line
naming the value and the fix, before any training, through the CLI's own entry point."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import torchvision
from helpers import cli_in_process
from test_bad_input import one_line
from test_user_data import write_image_folder

from prefast.errors import ConfigError
from prefast.models import build_model

RUN = ["train", "--mode", "baseline", "--epochs", "1", "--device", "cpu"]
DIGITS = ["--dataset", "digits"]  # 8 px, one channel
CIFAR_SHAPED = ["--dataset", "synthetic", "--synthetic-size", "64,32"]  # 32 px, 3 channels
SMALL = "or a model for small images (densenet-bc, preact-resnet18, wrn)"
BY_HAND = (
    ": pass the stages by hand from Python: prefast.train(cfg, model=prefast.StagedModel("
    "[stage0, stage1, ..., head])) (docs/python-api.md)"
)


def weights_file(tmp_path, what: str) -> str:
    """A file for --weights, as issue 44 describes each."""
    file = tmp_path / f"{what}.pt"
    torch.manual_seed(0)
    if what == "cifar-resnet18":  # a CIFAR ResNet: 3x3 stem where torchvision's is 7x7
        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)
        torch.save(model.state_dict(), file)
    elif what == "whole-model":  # torch.save(model) instead of its state dict
        torch.save(torchvision.models.resnet18(num_classes=10), file)
    return str(file)


# (id, the CLI's arguments after RUN (WEIGHTS: a file made by weights_file), the line)
REFUSALS = [
    ("5-cait-split-fails", [*CIFAR_SHAPED, "--model", "timm:cait_xxs24_224"],
     "prefast: error: cannot split timm:cait_xxs24_224 into freeze stages: the split model "
     "fails where the model runs (TypeError: 'Identity' object is not iterable)" + BY_HAND),
    ("5-levit-split-fails", [*CIFAR_SHAPED, "--model", "timm:levit_128s"],
     "prefast: error: cannot split timm:levit_128s into freeze stages: the split model fails "
     "where the model runs (RuntimeError: running_mean should contain 1 elements not 384)"
     + BY_HAND),
    ("6-vit-on-digits", [*DIGITS, "--model", "timm:vit_tiny_patch16_224"],
     "prefast: error: --model timm:vit_tiny_patch16_224 cannot take 8 px images: it cuts "
     "images into patches and 8 px holds none (it needs 16 px for one patch): use images of "
     f"at least 32 px (--dataset imagefolder --image-size 32) {SMALL}"),
    ("6-vgg-on-digits", [*DIGITS, "--model", "torchvision:vgg11_bn"],
     "prefast: error: --model torchvision:vgg11_bn cannot take 8 px images (its forward "
     "fails: RuntimeError: Given input size: (512x1x1). Calculated output size: (512x0x0). "
     "Output size is too small; it runs at 32 px): use images of at least 32 px (--dataset "
     f"imagefolder --image-size 32) {SMALL}"),
    ("8-3x3-stem-into-one-channel-resnet18",
     [*DIGITS, "--model", "torchvision:resnet18", "--weights", "WEIGHTS:cifar-resnet18"],
     "prefast: error: --weights {file} does not fit --model: the first key that differs is "
     "'conv1.weight' (file (64, 3, 3, 3), model (64, 1, 7, 7)): pass weights saved from "
     "--model's architecture, or the --model they were saved from"),
    ("11-whole-pickled-model",
     [*DIGITS, "--model", "torchvision:resnet18", "--weights", "WEIGHTS:whole-model"],
     "prefast: error: --weights {file} is a whole pickled model "
     "(torchvision.models.resnet.ResNet), not a state dict (--weights never unpickles code): "
     "save its weights with torch.save(model.state_dict(), PATH) and pass that file"),
]  # fmt: skip


@pytest.mark.parametrize("args, line", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_a_model_input_it_cannot_take_exits_2_in_one_line(tmp_path, capsys, caplog, args, line):
    file = None
    for i, arg in enumerate(args):
        if arg.startswith("WEIGHTS:"):
            file = args[i] = weights_file(tmp_path, arg.removeprefix("WEIGHTS:"))
    res = cli_in_process(capsys, caplog, *RUN, *args)
    assert one_line(res) == line.format(file=file)
    assert "Traceback" not in res.stderr and "\x1b" not in res.stderr
    assert "epoch   1/" not in res.stdout  # refused before any training


def test_an_image_size_a_vit_takes_in_one_patch_trains_and_the_log_says_so_once(caplog):
    """24 px images in 16 px patches: one patch. It builds (a warning, once for the model
    and size, however often it is built), and refuses 8 px in one line."""
    from prefast.models import check

    check._warned.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            m = build_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=10,
                            image_size=24)  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if "patch" in r.getMessage()]
    assert warned == [
        "--model timm:vit_tiny_patch16_224 sees 1 patch in 24 px images: a ViT learns little "
        "from fewer than 4 (use --image-size 32 or more)"
    ]
    assert m(torch.randn(2, 3, 24, 24)).shape == (2, 10)
    caplog.clear()
    build_model("torchvision:vit_b_16", in_channels=3, num_classes=10, image_size=16)
    assert "--model torchvision:vit_b_16 sees 1 patch in 16 px images" in caplog.text
    caplog.clear()
    build_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=10, image_size=32)
    assert "patch" not in caplog.text  # 4 patches: nothing to say
    with pytest.raises(ConfigError, match="cannot take 8 px images: it cuts images into"):
        build_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=10, image_size=8)


def test_an_image_folder_resized_below_a_vits_patch_exits_2_in_one_line(tmp_path, capsys,
                                                                        caplog):  # fmt: skip
    data = write_image_folder(tmp_path / "imgs", per_class=(4, 2))
    res = cli_in_process(
        capsys, caplog, *RUN, "--dataset", "imagefolder", "--data-dir", str(data), "--workers",
        "0", "--image-size", "8", "--model", "timm:vit_tiny_patch16_224",
    )  # fmt: skip
    assert re.fullmatch(
        r"prefast: error: --model timm:vit_tiny_patch16_224 cannot take 8 px images: .*",
        one_line(res),
    )


def test_the_build_check_leaves_the_random_stream_and_the_modes_as_they_were():
    """The check runs on images of its own generator: after the build the run's random
    stream is where timm's own build leaves it; the model comes back in training mode."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    timm.create_model("resnet18", num_classes=10, in_chans=3)
    expected = torch.rand(3)
    torch.manual_seed(0)
    m = build_model("timm:resnet18", in_channels=3, num_classes=10, image_size=32)
    assert torch.equal(torch.rand(3), expected)
    assert all(module.training for module in m.modules())


def test_an_image_folder_of_grayscale_images_says_it_reads_three_channels(tmp_path, caplog):
    from PIL import Image

    from prefast.data.imagefolder import imagefolder_splits

    rgb = write_image_folder(tmp_path / "rgb", per_class=(3, 2))  # saved as RGB
    gray = tmp_path / "gray"
    for path in sorted(rgb.rglob("*.png")):
        target = gray / path.relative_to(rgb)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("L").save(target)
    with caplog.at_level(logging.WARNING):
        imagefolder_splits(rgb, None, "none")
        assert caplog.records == []
        train, _ = imagefolder_splits(gray, None, "none")
    assert [r.getMessage() for r in caplog.records] == [
        f"imagefolder: the images in {gray / 'train'} are grayscale (mode L): each is read as "
        "three identical RGB channels, as torchvision's ImageFolder reads it"
    ]
    x = train[0][0]  # (3, 8, 8): the same channel three times, standardized alike
    assert x.shape[0] == 3 and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


@pytest.mark.slow  # about 25 s on 2 cores
def test_a_sample_of_timm_families_splits_with_equal_logits_or_refuses_in_one_line():
    """benchmarks/timm_scan.py's sample (families issue 44 named, and some that split),
    built as --model timm:NAME builds them: each splits with the unsplit model's logits or
    is a ConfigError of one line (exit 2), never another exception."""
    pytest.importorskip("timm")
    from prefast.benchmarks.timm_scan import SAMPLE, scan_family

    # The families the issue named, and one of each way a timm model splits (make check's
    # time: the whole sample is `python benchmarks/timm_scan.py --quick`).
    families = ("cait", "fastvit", "levit", "hrnet", "deit", "vision_transformer",
                "swin_transformer", "convnext", "resnet", "densenet", "regnet", "csatv2")  # fmt: skip
    rows = [scan_family(family, SAMPLE[family]) for family in families]
    for row in rows:
        assert row["kind"] in ("split", "refused") or "took over" in row["outcome"], row
        if row["kind"] == "split":
            assert row["max_abs_diff"] <= 1e-4 and row["outcome"].startswith("split, equal"), row
        else:
            assert "\n" not in row["outcome"], row
    kinds = {r["family"]: r["kind"] for r in rows}
    assert kinds["cait"] == kinds["levit"] == kinds["hrnet"] == "refused"  # issue 44's
    assert kinds["deit"] == kinds["swin_transformer"] == kinds["densenet"] == "split"
    sizes = {r["family"]: r.get("image_size") for r in rows}
    assert sizes["csatv2"] == 64  # refused at 32 px in one line, built at 64
