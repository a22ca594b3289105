"""--freeze-prefix K: stages 0..K-1 frozen from the first iteration (fine-tuning with a
frozen backbone); prefast caches that prefix from the first epoch."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
import torchvision
from helpers import DIGITS, cli_in_process
from test_token_rows import tiny_vit
from test_user_data import digits_tensors
from torch import nn
from torch.nn import functional as F

from prefast import TrainConfig
from prefast.errors import ConfigError
from prefast.freezing.schedule import FreezeOutSchedule
from prefast.training.trainer import Trainer

EPOCHS, LR = 3, 0.05


def test_the_prefix_is_frozen_from_iteration_0_and_t_i_run_over_the_rest():
    s = FreezeOutSchedule(10, 1000, t0=0.5, scale="linear", prefix=4)
    assert [s.freeze_iter(i) for i in range(4)] == [0, 0, 0, 0]
    assert s.frozen_prefix(0) == 4 and s.lr(3, 0) == 0.0
    assert s.t(4) == 0.5 and s.t(9) == 1.0  # stage K takes t0, the head 1
    assert [round(s.t(i), 3) for i in range(4, 10)] == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    one_cosine = FreezeOutSchedule(10, 1000, t0=1.0, prefix=9)
    assert one_cosine.lr(9, 500) == pytest.approx(one_cosine.base_lr * 0.5)
    with pytest.raises(ConfigError, match="--freeze-prefix 10: the model has 10 stages"):
        FreezeOutSchedule(10, 1000, prefix=10)


def resnet_for_digits() -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    m.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
    return m


def timm_vit() -> nn.Module:
    """timm's ViT-Tiny at digits' size: 8 px, 4 px patches, 3 blocks."""
    timm = pytest.importorskip("timm", reason="the timm extra: pip install 'prefast[timm]'")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                             img_size=8, patch_size=4, in_chans=1, depth=3)  # fmt: skip


def recorded_run(cfg: TrainConfig, model: nn.Module) -> tuple[dict, dict[int, list]]:
    """PreFast's run and the sample ids of each of its steps."""
    train_ds, test_ds = digits_tensors()
    tr = Trainer(cfg, model=model, train_data=train_ds, test_data=test_ds)
    steps: dict[int, list] = defaultdict(list)
    original, bpe = tr._step, tr.raw.batches_per_epoch

    def step(batch, it):
        steps[it // bpe].append(batch.ids.clone())
        return original(batch, it)

    tr._step = step  # type: ignore[method-assign]
    return tr.run(), steps


def plain_pytorch(model: nn.Module, head: nn.Module, steps: dict[int, list]) -> list[float]:
    """What a PyTorch user writes: the backbone in eval mode with requires_grad_(False),
    SGD on the head, one cosine over the run, the same batches."""
    x, y = digits_tensors()[0].tensors
    model.eval().requires_grad_(False)
    head.requires_grad_(True)
    opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)  # fmt: skip
    total = sum(len(b) for b in steps.values())
    losses, it = [], 0
    for epoch in range(EPOCHS):
        seen = []
        for ids in steps[epoch]:
            for group in opt.param_groups:
                group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * it / total))
            loss = F.cross_entropy(model(x[ids]), y[ids])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen.append(loss.item())
            it += 1
        losses.append(sum(seen) / len(seen))
    return losses


@pytest.mark.parametrize(
    "family, tier",
    [("timm-vit", "zarr")]
    + [pytest.param(f, t, marks=pytest.mark.slow)
       for f, t in (("resnet", "ram"), ("resnet", "zarr"), ("timm-vit", "ram"), ("vit", "ram"),
                    ("vit", "zarr"))],
)  # fmt: skip
def test_a_linear_probe_gives_the_plain_pytorch_loops_losses(tmp_path, family, tier):
    build = {"resnet": resnet_for_digits, "vit": tiny_vit, "timm-vit": timm_vit}[family]
    cfg = TrainConfig(**{**DIGITS, "epochs": EPOCHS, "lr": LR, "mode": "prefast", "t0": 1.0,
                         "freeze_prefix": "all", "cache_dtype": "float32", "augment": "none",
                         "cache_tier": tier, "cache_dir": str(tmp_path)})  # fmt: skip
    run, steps = recorded_run(cfg, build())
    read = [e["cached_batches"] for e in run["epochs"]]
    assert read[0] == 0 and all(n == len(steps[e]) for e, n in enumerate(read) if e > 0)
    model = build()
    # PreFast's head: ResNet's pool and fc; a ViT's final norm, class token and classifier
    head = {
        "resnet": lambda: model.fc,
        "vit": lambda: nn.ModuleList([model.encoder.ln, model.heads]),
        "timm-vit": lambda: nn.ModuleList([model.norm, model.fc_norm, model.head]),
    }[family]()
    plain = plain_pytorch(model, head, steps)
    prefast = [e["train_loss"] for e in run["epochs"]]
    assert max(abs(a - b) / b for a, b in zip(prefast, plain, strict=True)) <= 1e-6, (
        prefast,
        plain,
    )


def test_every_mode_keeps_the_prefix_frozen_and_prefast_reads_it_from_epoch_2(tmp_path):
    base = {**DIGITS, "epochs": EPOCHS, "t0": 1.0, "freeze_prefix": 2, "augment": "none"}
    runs = {}
    for mode in ("baseline", "freezeout", "prefast"):
        cfg = TrainConfig(**{**base, "mode": mode, "cache_dtype": "float32",
                             "cache_dir": str(tmp_path)})  # fmt: skip
        runs[mode], _ = recorded_run(cfg, tiny_vit())
    losses = {m: [e["train_loss"] for e in r["epochs"]] for m, r in runs.items()}
    assert losses["baseline"] == losses["freezeout"]  # t0 1: one cosine in both
    assert (
        max(abs(a - b) / b for a, b in zip(losses["prefast"], losses["freezeout"], strict=True))
        <= 1e-6
    )
    assert all(e["frozen_stages"] == 2 for r in runs.values() for e in r["epochs"])
    events = runs["prefast"]["final"]["cache_events"]
    assert [(e["epoch"], e["stage"]) for e in events if e["event"] == "boundary"] == [(0, 2)]


def test_plan_shows_the_prefix_boundary_in_the_first_epoch(capsys, caplog):
    res = cli_in_process(capsys, caplog, "plan", "--dataset", "digits", "--model",
                         "densenet-bc", "--depth", "16", "--epochs", "5", "--t0", "1",
                         "--freeze-prefix", "4", "--cache-boundaries", "every")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "  epoch 1: stages 0..3 " in res.stdout


def test_a_prefix_longer_than_the_model_exits_2_in_one_line(capsys, caplog):
    res = cli_in_process(capsys, caplog, "train", "--dataset", "digits", "--model",
                         "densenet-bc", "--depth", "16", "--freeze-prefix", "12")  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "prefast: error: --freeze-prefix 12: the model has 10 stages, the last being the "
        "head: freeze at most 9 (or pass all)"
    )


def test_a_sweep_reads_the_prefix_from_the_cache_from_its_first_epoch(tmp_path):
    """The key of a frozen prefix holds its weights, the data, augmentation, seed and
    dtype, not the learning rate or the epoch count: the second run of a sweep computes
    no prefix at all."""
    runs = []
    for lr, epochs in ((0.05, 3), (0.02, 2)):
        cfg = TrainConfig(**{**DIGITS, "epochs": epochs, "lr": lr, "mode": "prefast",
                             "t0": 1.0, "freeze_prefix": "all", "augment": "none",
                             "cache_tier": "zarr", "cache_dir": str(tmp_path)})  # fmt: skip
        runs.append(recorded_run(cfg, tiny_vit())[0])
    first, second = (r["epochs"][0] for r in runs)
    assert first["cached_batches"] == 0 and second["cached_batches"] == second["steps"]
    assert any(e["event"] == "reused" for e in runs[1]["final"]["cache_events"])


@pytest.mark.slow  # a subprocess training twice
def test_the_finetune_example_runs(tmp_path):
    import subprocess
    import sys

    from test_user_data import write_image_folder

    data = write_image_folder(tmp_path / "imgs", per_class=(16, 6))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "backbone.pt")
    res = subprocess.run(
        [sys.executable, "examples/finetune.py", str(data), "--weights",
         str(tmp_path / "backbone.pt"), "--epochs", "2", "--image-size", "32",
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = {ln.split()[0]: ln.split() for ln in res.stdout.splitlines() if " losses " in ln}
    assert lines["freezeout"][2:4] == lines["prefast"][2:4]  # the same two epoch losses
    assert "prefast vs the prefix computed every step" in res.stdout
