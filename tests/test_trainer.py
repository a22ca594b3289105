import json

import pytest
import torch

from prefast.config import TrainConfig
from prefast.errors import ConfigError
from prefast.training.trainer import Trainer, train

FAST = dict(
    model="densenet-bc",
    dataset="digits",
    depth=10,
    epochs=4,
    batch_size=128,
    t0=0.5,
    augment="none",
    device="cpu",
)


def test_frozen_weights_never_change_and_stay_eval(tmp_path):
    tr = Trainer(TrainConfig(mode="freezeout", **FAST))
    snapshots_copy = []

    def on_epoch(rec):
        snapshots_copy.append(
            (
                tr.model.num_frozen,
                [{k: v.clone() for k, v in s.state_dict().items()} for s in tr.model.stages],
            )
        )
        for stage in tr.model.stages[: tr.model.num_frozen]:
            assert not any(m.training for m in stage.modules())

    tr.on_epoch = on_epoch
    tr.run()
    final_frozen, final = snapshots_copy[-1]
    assert final_frozen >= 2, "the schedule should freeze stages in 4 epochs at t0=0.5"
    for frozen, states in snapshots_copy:
        for i in range(frozen):
            for k in states[i]:
                assert torch.equal(states[i][k], final[i][k]), (
                    f"stage {i} {k} changed after freezing"
                )
    # frozen stages left the optimizer
    assert {g["stage"] for g in tr.opt.param_groups} == set(
        range(final_frozen, tr.model.num_stages)
    )


@pytest.mark.parametrize("mode", ["baseline", "freezeout", "prefast"])
def test_each_sample_once_per_epoch(mode, tmp_path, monkeypatch):
    seen: dict[int, list] = {}
    original = Trainer._step

    def spy(self, batch, it):
        seen.setdefault(it // self.raw.batches_per_epoch, []).append(batch.ids.clone())
        return original(self, batch, it)

    monkeypatch.setattr(Trainer, "_step", spy)
    train(TrainConfig(mode=mode, cache_dir=str(tmp_path), cache_tier="zarr", **FAST))
    n = 1437  # digits training split
    assert len(seen) == FAST["epochs"]
    for ids in seen.values():
        assert sorted(torch.cat(ids).tolist()) == list(range(n))


def test_json_record_shape_and_resume(tmp_path):
    ck = tmp_path / "ck.pt"
    cfg = TrainConfig(mode="freezeout", checkpoint=str(ck), **{**FAST, "epochs": 2})
    first = train(cfg)
    assert set(first) >= {"config", "epochs", "final"}
    assert set(first["epochs"][0]) >= {
        "epoch",
        "train_loss",
        "test_acc",
        "time_s",
        "frozen_stages",
        "cache_tier",
    }
    json.dumps(first)
    resumed = train(cfg.replace(resume=True, epochs=2))
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1]  # nothing left to run
    with pytest.raises(ConfigError, match="t0"):
        train(cfg.replace(resume=True, t0=0.9))


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="--t0 1.5"):
        TrainConfig(t0=1.5)
    with pytest.raises(ConfigError, match="--model 'nope'"):
        TrainConfig(model="nope")


@pytest.mark.parametrize("world", [1, 2])
def test_a_samples_augmentation_depends_on_seed_stream_and_sample_only(world):
    """Not on the epoch's order, the batch size or the ranks: a cached augmented view is
    reproduced from raw data sample by sample (after a fault, on resume)."""
    import numpy as np

    from prefast.data.datasets import digits
    from prefast.data.sources import TensorSource

    train_ds, test_ds = digits()

    def by_row(batch_size: int, epoch: int, rank: int = 0, w: int = 1) -> dict:
        src = TensorSource(train_ds, test_ds, batch_size, 0, "standard", torch.device("cpu"),
                           rank, w)  # fmt: skip
        rows = {}
        for b in src.train_batches(epoch, view=5):
            assert b.stream == 5
            for pos, x in zip(b.ids.tolist(), b.x, strict=True):
                rows[int(src.shard[pos])] = x
        return rows

    one = by_row(64, epoch=3)
    other = by_row(32, epoch=7)  # another order and batch size, the same stream
    ranks = {}
    for r in range(world):
        ranks.update(by_row(64, epoch=1, rank=r, w=world))
    assert one.keys() == other.keys() == ranks.keys()
    assert all(torch.equal(one[k], other[k]) and torch.equal(one[k], ranks[k]) for k in one)
    src = TensorSource(train_ds, test_ds, 64, 0, "standard", torch.device("cpu"))
    x6 = torch.cat([b.x for b in src.train_batches(3, view=6)])
    x5 = torch.cat([b.x for b in src.train_batches(3, view=5)])
    assert not torch.equal(x5, x6) and np.isfinite(x5.numpy()).all()  # streams differ
