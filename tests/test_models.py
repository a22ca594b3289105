import pytest
import torch
from torch import nn

from prefast.errors import ConfigError
from prefast.models import build_model, from_sequential, from_torchvision_resnet


@pytest.mark.parametrize(
    "name,kw,stages",
    [
        ("densenet-bc", {"depth": 16}, 10),
        ("densenet-bc", {"depth": 76}, 40),
        ("wrn", {"depth": 10, "width": 1}, 5),
        ("preact-resnet18", {}, 10),
        ("vgg16", {}, 14),
        ("resnet18", {}, 10),  # torchvision's: stem, 8 blocks, head
    ],
)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_models_build_and_run(name, kw, stages, shape):
    if name == "densenet-bc" and kw["depth"] == 76 and shape[1] == 32:
        pytest.skip("covered at 8x8; the 32x32 forward is slow on CPU")
    m = build_model(name, in_channels=shape[0], num_classes=10, image_size=shape[1], **kw)
    assert m.num_stages == stages
    assert m(torch.randn(2, *shape)).shape == (2, 10)


def test_bad_depth_and_model_are_config_errors():
    with pytest.raises(ConfigError, match="depth 17"):
        build_model("densenet-bc", in_channels=3, num_classes=10, image_size=32, depth=17)
    with pytest.raises(ConfigError, match="unknown model 'resnet9000'"):
        build_model("resnet9000", in_channels=3, num_classes=10, image_size=32)


def test_adapters_split_sequential_and_torchvision_resnet():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    m = from_sequential(seq)
    assert m.num_stages == 4 and m(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    import torchvision

    tv = from_torchvision_resnet(torchvision.models.resnet18(num_classes=7))
    assert tv.num_stages == 1 + 8 + 1
    assert tv(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_frozen_prefix_stays_in_eval_mode_across_train_calls():
    m = build_model("densenet-bc", in_channels=1, num_classes=10, image_size=8, depth=10)
    m.freeze_prefix(2)
    m.train()
    m.train(True)
    for i, stage in enumerate(m.stages):
        modes = {mod.training for mod in stage.modules()}
        assert modes == ({False} if i < 2 else {True}), i
        assert all(p.requires_grad == (i >= 2) for p in stage.parameters())
