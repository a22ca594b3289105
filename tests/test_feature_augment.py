"""Feature-space augmentation of cached activations (prefast/caching/feature_augment.py)."""

import numpy as np
import pytest
import torch
from helpers import DIGITS, corrupt_chunk_read_mid_epoch, rel_diff, train_cache_key

from prefast.caching.feature_augment import FeatureAugment, max_shift
from prefast.config import TrainConfig, parse_ops
from prefast.data.sources import Batch, batch_loss
from prefast.errors import ConfigError
from prefast.store import CacheRoot
from prefast.training.trainer import train


def cfg_for(tmp_path, **kw):
    return TrainConfig(
        mode="prefast",
        cache_dir=str(tmp_path),
        **{**DIGITS, "epochs": 6, "cache_boundaries": "every", "cache_tier": "ram", **kw},
    )


def losses(run: dict) -> list[float]:
    return [e["train_loss"] for e in run["epochs"]]


# -- the ops, one batch at a time ----------------------------------------------------------
def test_bad_ops_and_modes_are_refused_with_the_fix():
    assert parse_ops("shift, flip,shift") == ("shift", "flip")
    with pytest.raises(ConfigError, match="crop is not an op; choose from shift, flip, mix"):
        parse_ops("shift,crop")
    with pytest.raises(ConfigError, match="needs --mode prefast"):
        TrainConfig(mode="freezeout", feature_augment="flip")


def test_mixed_labels_give_the_hand_computed_loss():
    """Manifold Mixup's loss is the cross-entropy against the mixed one-hot label."""
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    y, partner = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    lam = torch.tensor([0.25, 1.0, 0.5, 0.9])
    batch = Batch(torch.zeros(4), y, torch.arange(4), y, mix=(partner, lam))
    onehot = torch.eye(3)
    target = lam[:, None] * onehot[y] + (1 - lam[:, None]) * onehot[partner]
    p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    by_hand = -(target * torch.log(p)).sum(1).mean()
    assert batch_loss(logits, batch).item() == pytest.approx(by_hand.item(), rel=1e-6)
    plain = Batch(torch.zeros(4), y, torch.arange(4), y)
    assert batch_loss(logits, plain).item() == pytest.approx(
        -torch.log(p[torch.arange(4), y]).mean().item(), rel=1e-6
    )


def test_mix_pairs_each_sample_with_a_batch_partner_and_its_label():
    aug = FeatureAugment(("mix",), seed=0, rows=100)
    x = torch.randn(8, 3, 4, 4)
    ids, y = torch.arange(10, 18), torch.arange(8)
    out, (partner_y, lam) = aug.apply(x, ids, y, epoch=2)
    partner = partner_y  # labels are the batch positions here
    assert sorted(partner.tolist()) == list(range(8)) and (partner != y).all()
    w = lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(out, w * x + (1 - w) * x[partner])
    assert ((lam > 0) & (lam < 1)).all()
    # the same (seed, epoch, samples) give the same draws; another epoch others
    again, (_, lam2) = FeatureAugment(("mix",), 0, 100).apply(x, ids, y, epoch=2)
    assert torch.equal(again, out) and torch.equal(lam2, lam)
    assert not torch.equal(FeatureAugment(("mix",), 0, 100).apply(x, ids, y, 3)[0], out)


def test_shift_and_flip_move_each_map_by_its_own_draw_zero_filled():
    aug = FeatureAugment(("shift", "flip"), seed=1, rows=64)
    x = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16).repeat(64, 2, 1, 1) + 1
    ids = torch.arange(64)
    out, mix = aug.apply(x, ids, torch.zeros(64, dtype=torch.long), epoch=0)
    assert mix is None and max_shift(16) == 2
    s = 2
    for i in range(64):
        dy, dx = (np.floor(aug.shift_u[:, i] * (2 * s + 1)).astype(int) - s).tolist()
        want = torch.zeros(16, 16)
        src = x[i, 0]
        for r in range(16):
            for c in range(16):
                if 0 <= r + dy < 16 and 0 <= c + dx < 16:
                    want[r, c] = src[r + dy, c + dx]
        if aug.flip[i]:
            want = want.flip(1)
        assert torch.equal(out[i, 0], want), i
    assert not torch.equal(out, x)
    small = torch.randn(3, 2, 4, 4)  # under 8 pixels: no shift, only the flips
    flipped, _ = aug.apply(small, ids[:3], ids[:3], epoch=0)
    want = torch.where(torch.from_numpy(aug.flip[:3])[:, None, None, None], small.flip(3), small)
    assert max_shift(4) == 0 and torch.equal(flipped, want)


# -- in training ---------------------------------------------------------------------------
# In these 6-epoch digits runs the cached maps are 4x4 and smaller, where shift does
# nothing (max_shift 0), so flip makes the difference; the synthetic 32x32 images give
# 16x16 and 8x8 maps, where shift alone moves them by up to 2 and 1 pixels.
SYNTHETIC_SMALL = {"dataset": "synthetic", "synthetic_size": (512, 64), "depth": 10, "epochs": 4}


@pytest.mark.slow  # three training runs each (make check)
@pytest.mark.parametrize(
    "data,ops", [({}, "shift,flip"), (SYNTHETIC_SMALL, "shift")], ids=["digits", "synthetic"]
)
def test_the_same_seed_gives_the_same_augmented_run_and_no_byte_more(tmp_path, data, ops):
    kw = {"feature_augment": ops, **data}
    first = train(cfg_for(tmp_path / "a", **kw))
    again = train(cfg_for(tmp_path / "b", **kw))
    plain = train(cfg_for(tmp_path / "c", **data))
    assert losses(first) == losses(again)
    assert losses(first) != losses(plain)  # the ops changed what trained
    cached = [e for e in first["epochs"] if e["cached_batches"]]
    assert cached and all(e["feature_ops"] == ops.split(",") for e in cached)
    assert all(e["feature_batches"] == e["cached_batches"] for e in cached)
    assert all(e["feature_ops"] == [] for e in first["epochs"] if not e["cached_batches"])
    assert sum(e["feature_s"] for e in cached) > 0

    # the ops add no byte: every boundary holds what it holds without them
    def held(run: dict) -> list[tuple]:
        return [(e["stage"], e["tier"], e["bytes"])
                for e in run["final"]["cache_events"] if e["event"] == "boundary"]  # fmt: skip

    assert held(first) == held(plain) and held(first)
    assert first["final"]["cache_peak_bytes"] == plain["final"]["cache_peak_bytes"]


@pytest.mark.slow  # two 10-epoch runs (make check)
def test_a_fault_mid_epoch_serves_the_unseen_samples_the_same_feature_ops(tmp_path, monkeypatch):
    """Stage 2's cache is damaged mid-epoch 3 (its chunk 64 KiB): the rest of the epoch
    comes from raw data, through the prefix and the same ops, batch for batch."""
    monkeypatch.setattr("prefast.store.base.CHUNK_BYTES", 64 * 1024)
    kw = {"feature_augment": "shift,flip", "cache_tier": "mmap", "epochs": 10}
    clean = train(cfg_for(tmp_path / "clean", **kw))
    cfg = cfg_for(tmp_path / "hit", **kw)
    root, hit = CacheRoot(tmp_path / "hit"), {}

    def on_epoch(rec):
        if rec["epoch"] == 2:
            key = train_cache_key(root, 2)
            hit["chunk"] = corrupt_chunk_read_mid_epoch(root, key, cfg.seed, 3, 64, False)

    from prefast.training.trainer import Trainer

    run = Trainer(cfg, on_epoch=on_epoch).run()
    faulted = run["epochs"][3]
    assert "chunk" in hit and 0 < faulted["cached_batches"] < run["final"]["batches_per_epoch"]
    assert [e["epoch"] for e in run["final"]["cache_events"] if e["event"] == "corrupted"] == [3]
    assert rel_diff(run, clean) <= 1e-6  # the same numbers as without the fault
    assert faulted["feature_batches"] == run["final"]["batches_per_epoch"]  # every batch
