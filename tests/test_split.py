"""Models from torchvision split by their own structure compute what the unsplit model
computes (docs/models.md lists the families and their cuts)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from prefast import StagedModel
from prefast.errors import ConfigError
from prefast.models import as_staged_model, build_model
from prefast.models.split import split_model

# The smallest variant of each family, its stage count (head included) and an input size
# it takes; make test checks one of each kind of split, make check every family.
FAMILIES = [
    ("resnet18", 10, 32),
    pytest.param("wide_resnet50_2", 18, 32, marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", 18, 32, marks=pytest.mark.slow),
    ("vgg11_bn", 6, 32),
    pytest.param("alexnet", 4, 64, marks=pytest.mark.slow),
    pytest.param("squeezenet1_0", 10, 64, marks=pytest.mark.slow),
    pytest.param("densenet121", 9, 32, marks=pytest.mark.slow),
    ("efficientnet_b0", 10, 32),
    pytest.param("mobilenet_v2", 20, 32, marks=pytest.mark.slow),
    pytest.param("mobilenet_v3_small", 14, 32, marks=pytest.mark.slow),
    pytest.param("mnasnet0_5", 8, 32, marks=pytest.mark.slow),
    pytest.param("regnet_x_400mf", 6, 32, marks=pytest.mark.slow),
    ("convnext_tiny", 9, 32),
    pytest.param("swin_t", 9, 32, marks=pytest.mark.slow),
    pytest.param("vit_b_16", 14, 32, marks=pytest.mark.slow),
]


def unsplit(name: str, size: int) -> nn.Module:
    extra = {"image_size": size} if name.startswith("vit_") else {}
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=10, **extra).eval()


def max_abs_difference(split: StagedModel, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (split(x).cpu() - model(x.cpu())).abs().max().item()


@pytest.mark.parametrize("name, stages, size", FAMILIES)
def test_the_split_model_gives_the_unsplit_models_logits(name, stages, size):
    model = unsplit(name, size)
    children = dict(model.named_children())
    split = as_staged_model(model, name=name).eval()
    assert split.num_stages == stages
    x = torch.randn(2, 3, size, size)
    assert max_abs_difference(split, model, x) == 0.0
    # the model passed in is left as it was (the head runs a copy of its forward)
    assert dict(model.named_children()) == children
    # each stage's parameters are the model's own, and no two stages share one
    ids = [id(p) for s in split.stages for p in s.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "name, size",
    [("resnet18", 32), ("efficientnet_b0", 32), pytest.param("vit_b_16", 32, marks=pytest.mark.slow),
     pytest.param("convnext_tiny", 32, marks=pytest.mark.slow),
     pytest.param("swin_t", 32, marks=pytest.mark.slow)],
)  # fmt: skip
def test_the_split_model_runs_on_the_strict_device_with_the_cpu_logits(name, size, strict):
    model = unsplit(name, size)
    split = split_model(unsplit(name, size), name=name).eval().to(strict.device)
    x = torch.randn(2, 3, size, size)
    assert max_abs_difference(split, model, x.to(strict.device)) == 0.0


def test_a_library_model_is_built_for_the_data():
    """Digits: one channel, 8 px, 10 classes; a ViT takes the data's image size."""
    m = build_model("torchvision:resnet18", in_channels=1, num_classes=10, image_size=8)
    assert m.num_stages == 10 and m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    vit = build_model("torchvision:vit_b_32", in_channels=3, num_classes=7, image_size=64)
    assert vit.num_stages == 14 and vit(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert vit.stages[0](torch.randn(1, 3, 64, 64)).shape == (1, 1 + 4, 768)  # token rows


@pytest.mark.parametrize(
    "name, message",
    [
        ("shufflenet_v2_x0_5", r"cannot split torchvision:shufflenet_v2_x0_5 into freeze stages: pass the stages "
                      r"by hand from Python: prefast.train\(cfg, model=prefast.StagedModel\("),
        ("resnet9000", "is not a torchvision classification model"),
        ("vit_b_16", "cannot take 8 px images"),
    ],
)  # fmt: skip
def test_a_library_model_that_cannot_be_built_or_split_is_one_line(name, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_model(f"torchvision:{name}", in_channels=1, num_classes=10, image_size=8)
    assert "\n" not in str(err.value)


# timm (the optional extra): the smallest variant of each family, its stages, and the
# input size it is built at (img_size for a ViT).
TIMM_FAMILIES = [
    ("vit_tiny_patch16_224", 14),  # embedding + 12 blocks + head
    pytest.param("deit_tiny_patch16_224", 14, marks=pytest.mark.slow),
    ("convnext_atto", 6),  # stem + 4 stages + head
    pytest.param("resnet18", 10, marks=pytest.mark.slow),  # stem + 8 blocks + head
    pytest.param("efficientnet_b0", 9, marks=pytest.mark.slow),  # stem + 7 block stages + head
    ("regnetx_002", 15),  # stem + s1..s4's 13 blocks + head
    # features: conv0, norm0 + pool0, 4 dense blocks, 3 transitions, the final norm (after
    # a stem with nothing before the trunk) + head
    pytest.param("densenet121", 12, marks=pytest.mark.slow),
    pytest.param("rexnet_100", 19, marks=pytest.mark.slow),  # features: stem, 16 blocks, conv
]


@pytest.mark.parametrize("name, stages", TIMM_FAMILIES)
def test_a_timm_model_split_gives_the_unsplit_models_logits(name, stages):
    timm = pytest.importorskip("timm", reason="the timm extra: pip install 'prefast[timm]'")
    extra = {"img_size": 32} if "patch" in name else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **extra).eval()
    split = as_staged_model(model, name=name).eval()
    assert split.num_stages == stages
    assert max_abs_difference(split, model, torch.randn(2, 3, 32, 32)) == 0.0
    ids = [id(p) for s in split.stages for p in s.parameters()]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_a_timm_name_with_a_tag_timm_does_not_have_is_one_line():
    pytest.importorskip("timm", reason="the timm extra: pip install 'prefast[timm]'")
    with pytest.raises(ConfigError) as err:
        build_model("timm:vit_tiny_patch16_224.badtag", in_channels=1, num_classes=10,
                    image_size=8)  # fmt: skip
    assert str(err.value) == (
        "--model timm:vit_tiny_patch16_224.badtag: timm has no pretrained tag 'badtag' for "
        "vit_tiny_patch16_224: use one of augreg_in21k, augreg_in21k_ft_in1k, or "
        "timm:vit_tiny_patch16_224 for its default"
    )
    vit = build_model("timm:vit_tiny_patch16_224.augreg_in21k", in_channels=1, num_classes=10,
                      image_size=32)  # fmt: skip  # a tag timm has is built as before
    assert vit.num_stages == 14


def test_a_timm_vit_is_built_at_the_datas_size_and_runs_on_the_strict_device(strict):
    pytest.importorskip("timm", reason="the timm extra: pip install 'prefast[timm]'")
    m = build_model("timm:vit_tiny_patch16_224", in_channels=1, num_classes=10, image_size=32)
    assert m.num_stages == 14 and m.stages[0](torch.randn(1, 1, 32, 32)).shape == (1, 5, 192)
    cpu = copy.deepcopy(m).eval()
    x = torch.randn(2, 1, 32, 32)
    # timm's attention is F.scaled_dot_product_attention: the strict device dispatches its
    # math kernel, the CPU its fused one (3.6e-7 apart here); against the CPU's math
    # kernel the split model on the strict device is exact.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        assert max_abs_difference(m.eval().to(strict.device), cpu, x.to(strict.device)) == 0.0


def test_a_model_whose_forward_does_more_than_its_parts_is_refused():
    """Recognised by its ``features`` but rescaling its input first: the rule's split would
    apply the rescale to the feature maps; the check against its own forward refuses it."""

    class Rescaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
            self.classifier = nn.Linear(8 * 3 * 3, 10)

        def forward(self, x):
            return self.classifier(self.features(x * 2 - 1).flatten(1))

    model = Rescaled()
    with pytest.raises(ConfigError, match="does not compute what its forward does") as err:
        as_staged_model(model, check_on=torch.randn(2, 3, 8, 8))
    assert "\n" not in str(err.value)
    assert model.training  # put back as it was
    resnet = torchvision.models.resnet18(num_classes=10)  # a torchvision model passes
    assert as_staged_model(resnet, check_on=torch.randn(2, 3, 32, 32)).num_stages == 10
