"""Your own model and your own data: objects in, strings only at the CLI edge."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch
from helpers import cli, cli_in_process, leftovers
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from prefast import StagedModel, TrainConfig, train
from prefast.data.datasets import digits
from prefast.data.loader import data_identity
from prefast.errors import ConfigError
from prefast.store.order import batch_slices, epoch_order

CFG = dict(
    epochs=6, batch_size=64, t0=0.5, augment="none", cache_dtype="float32", device="cpu",
    workers=0, cache_boundaries="every",
)  # fmt: skip


def digits_tensors() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn digits as plain float TensorDatasets (what a user would build)."""
    train, test = digits()

    def as_float(split):
        x = (split.x.float() / 255.0 - 0.3) / 0.4
        return TensorDataset(x, split.y.clone())

    return as_float(train), as_float(test)


def small_net() -> nn.Sequential:
    torch.manual_seed(0)

    def block(i, o, pool=False):
        layers = [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
        return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

    return nn.Sequential(
        block(1, 16),
        block(16, 32),
        block(32, 32, pool=True),
        block(32, 64),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)),
    )


class Counting(Dataset):
    """A real dataset that counts how often it is read."""

    def __init__(self, inner: Dataset):
        self.inner, self.reads = inner, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads += 1
        return self.inner[i]


def test_own_sequential_and_dataset_prefast_equals_freezeout(tmp_path):
    train_ds, test_ds = digits_tensors()
    runs = {
        mode: train(
            TrainConfig(mode=mode, cache_dir=str(tmp_path), cache_tier="zarr", **CFG),
            model=small_net(),
            train_data=train_ds,
            test_data=test_ds,
        )
        for mode in ("freezeout", "prefast")
    }
    fo, pf = runs["freezeout"], runs["prefast"]
    assert pf["model"] == {"name": "custom", "num_stages": 5}
    assert pf["data"] == {"name": "TensorDataset", "train": 1437, "test": 360}
    assert [e["train_loss"] for e in pf["epochs"]] == pytest.approx(
        [e["train_loss"] for e in fo["epochs"]], rel=1e-6
    )
    assert [e["test_acc"] for e in pf["epochs"]] == [e["test_acc"] for e in fo["epochs"]]
    assert pf["epochs"][-1]["cached_batches"] == 23 and pf["epochs"][-1]["cache_tier"] == "zarr"
    assert fo["final"]["test_acc"] > 0.8
    assert not leftovers(tmp_path)


def test_the_loader_serves_the_shared_seed_epoch_order():
    train_ds, test_ds = digits_tensors()
    cfg = TrainConfig(mode="freezeout", **{**CFG, "epochs": 2})
    _, steps = train_recording_user(cfg, train_ds, test_ds)
    for epoch, batches in steps.items():
        order = epoch_order(cfg.seed, epoch, len(train_ds))
        expected = [order[sl] for sl in batch_slices(len(order), cfg.batch_size)]
        assert all(np.array_equal(a, b) for a, b in zip(batches, expected, strict=True))


def train_recording_user(cfg, train_ds, test_ds):
    from prefast.training.trainer import Trainer

    tr = Trainer(cfg, small_net(), train_ds, test_ds)
    steps: dict = {}
    original = tr._step

    def step(batch, it):
        steps.setdefault(it // tr.raw.batches_per_epoch, []).append(batch.ids.numpy().copy())
        return original(batch, it)

    tr._step = step
    return tr.run(), steps


def test_after_the_boundary_the_dataset_is_not_read_at_all(tmp_path):
    train_ds, test_ds = (Counting(d) for d in digits_tensors())
    reads = []

    def on_epoch(rec):
        reads.append((rec["epoch"], train_ds.reads, test_ds.reads, rec["cached_batches"]))
        train_ds.reads = test_ds.reads = 0

    train(
        TrainConfig(mode="prefast", cache_dir=str(tmp_path), cache_tier="ram", **CFG),
        on_epoch=on_epoch,
        model=small_net(),
        train_data=train_ds,
        test_data=test_ds,
    )
    # (epoch 0 also read the planning probe's batch and the items the data identity samples)
    full_reads = [r for r in reads[1:] if r[3] == 0]
    cached = [r for r in reads if r[3] == 23]
    assert full_reads and all(r[1] == 1437 for r in full_reads), reads
    # epochs that train from the cache read neither split (the test set is cached too)
    assert cached and all(r[1] == 0 and r[2] == 0 for r in cached[1:]), reads


def test_worker_processes_give_the_same_run():
    train_ds, test_ds = digits_tensors()
    cfg = TrainConfig(mode="freezeout", **{**CFG, "epochs": 2})
    one = train(cfg, model=small_net(), train_data=train_ds, test_data=test_ds)
    two = train(cfg.replace(workers=2), model=small_net(), train_data=train_ds, test_data=test_ds)
    assert [e["train_loss"] for e in one["epochs"]] == pytest.approx(
        [e["train_loss"] for e in two["epochs"]], rel=1e-6
    )
    # the run stopped its worker processes; left to the garbage collector they would
    # linger, and stopping them then took 20 s
    assert psutil.Process().children() == []


@pytest.mark.slow
def test_a_torchvision_resnet_is_split_into_stages():
    import torchvision

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(96, 3, 16, 16, generator=g), torch.randint(0, 4, (96,), generator=g)
    )
    run = train(
        TrainConfig(mode="freezeout", **{**CFG, "epochs": 1, "batch_size": 32}),
        model=torchvision.models.resnet18(num_classes=4),
        train_data=Subset(data, range(64)),
        test_data=Subset(data, range(64, 96)),
    )
    assert run["model"] == {"name": "custom", "num_stages": 10}  # stem, 8 blocks, head
    assert run["epochs"][0]["steps"] == 2


def test_a_model_that_cannot_be_split_says_how():
    class Net(nn.Module):
        def forward(self, x):
            return x

    train_ds, test_ds = digits_tensors()
    with pytest.raises(ConfigError, match=r"prefast.StagedModel\(\[stage0, stage1, ..., head\]\)"):
        train(TrainConfig(**CFG), model=Net(), train_data=train_ds, test_data=test_ds)
    with pytest.raises(ConfigError, match="pass both train_data and test_data"):
        train(TrainConfig(**CFG), model=small_net(), train_data=train_ds)
    staged = StagedModel(list(small_net().children()))
    run = train(
        TrainConfig(mode="baseline", **{**CFG, "epochs": 1}),
        model=staged,
        train_data=train_ds,
        test_data=test_ds,
    )
    assert run["model"]["num_stages"] == 5


@pytest.mark.parametrize("empty", ["train_data", "test_data"])
def test_an_empty_dataset_is_refused_before_training(empty):
    data = {"train_data": digits_tensors()[0], "test_data": digits_tensors()[1]}
    data[empty] = Subset(data[empty], [])
    split = "training" if empty == "train_data" else "test"
    with pytest.raises(ConfigError, match=f"the {split} set of Subset is empty"):
        train(TrainConfig(**CFG), model=small_net(), **data)


def test_data_identity_follows_the_data():
    train_ds, _ = digits_tensors()
    x, y = train_ds.tensors
    changed = TensorDataset(x.clone(), y.clone())
    changed.tensors[0][0] += 1.0  # row 0 is among the sampled rows
    assert data_identity(train_ds) == data_identity(TensorDataset(x.clone(), y.clone()))
    assert data_identity(train_ds) != data_identity(changed)
    assert data_identity(Subset(train_ds, range(100))) != data_identity(
        Subset(train_ds, range(1, 101))
    )


# -- ImageFolder through the CLI -----------------------------------------------------------
def write_image_folder(root, per_class=(40, 12), classes=("zero", "one", "two")):
    from PIL import Image

    train, test = digits()
    for split, (ds, n) in {"train": (train, per_class[0]), "val": (test, per_class[1])}.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            rows = (ds.y == c).nonzero().flatten()[:n]
            for r in rows.tolist():
                Image.fromarray(ds.x[r, 0].numpy(), mode="L").convert("RGB").save(
                    folder / f"{r}.png"
                )
    return root


@pytest.mark.slow
def test_imagefolder_trains_through_the_cli_and_caches(tmp_path):
    data = write_image_folder(tmp_path / "imgs")
    out = tmp_path / "run.json"
    args = [
        "train", "--mode", "prefast", "--dataset", "imagefolder", "--data-dir", str(data),
        "--image-size", "12", "--model", "densenet-bc", "--depth", "10", "--epochs", "4",
        "--t0", "0.3", "--batch-size", "32", "--augment", "standard", "--workers", "1",
        "--cache-tier", "zarr", "--cache-boundaries", "every", "--device", "cpu",
        "--cache-dir", str(tmp_path / "cache"), "--json-out", str(out),
    ]  # fmt: skip
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert doc["data"]["train"] == 120 and doc["data"]["test"] == 36
    assert doc["config"]["augment"] == "standard" and doc["config"]["image_size"] == 12
    assert doc["epochs"][-1]["cache_tier"] == "zarr" and doc["epochs"][-1]["cached_batches"] == 4
    plan = cli("plan", *args[3:-2], "--json")
    assert plan.returncode == 0, plan.stderr
    assert len(json.loads(plan.stdout)["stages"]) == doc["model"]["num_stages"]


@pytest.mark.parametrize("problem", ["no val folder", "empty class"])
def test_imagefolder_problems_are_one_line_errors(tmp_path, problem, capsys, caplog):
    data = write_image_folder(tmp_path / "imgs", per_class=(3, 2))
    if problem == "no val folder":
        import shutil

        shutil.rmtree(data / "val")
        needle = str(data / "val")
    else:
        for f in (data / "train" / "one").iterdir():
            f.unlink()
        needle = str(data / "train")
    args = ("train", "--dataset", "imagefolder", "--data-dir", str(data), "--device", "cpu")
    res = cli_in_process(capsys, caplog, *args)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_imagefolder_identity_changes_when_a_file_changes(tmp_path):
    from prefast.data.imagefolder import imagefolder_splits

    data = write_image_folder(tmp_path / "imgs", per_class=(3, 2))
    before = data_identity(imagefolder_splits(data, 8, "none")[0])
    img = next((data / "train" / "two").iterdir())
    img.write_bytes(img.read_bytes() + b"\0")  # a different file, same name
    assert data_identity(imagefolder_splits(data, 8, "none")[0]) != before
    assert data_identity(imagefolder_splits(data, 10, "none")[0]) != before  # the transform too


@pytest.mark.slow
def test_the_example_script_runs(tmp_path):
    data = write_image_folder(tmp_path / "imgs", per_class=(16, 6))
    res = subprocess.run(
        [sys.executable, "examples/own_model_imagefolder.py", str(data), "--epochs", "2",
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "prefast vs freezeout" in res.stdout


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_the_python_api_docs_example_runs_and_prints_what_it_says(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text()
    code = re.search(r"```python\n(import torch\n.*?)```", readme, re.S).group(1)
    code = code.replace("/tmp/prefast-example", str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    expected = re.search(r"# (\{'name': 'custom'.*)", code).group(1)
    assert res.stdout.strip() == expected


def inplace_net() -> nn.Sequential:
    """Every stage after the first begins with an in-place op on its input (as many
    nn.Sequential models and some torchvision cuts do): in training mode it writes into
    the very tensor the frozen prefix produced."""
    torch.manual_seed(0)

    def block(i, o):  # pre-activation: its input is a BatchNorm's output, free to change
        return nn.Sequential(
            nn.Dropout(0.2, inplace=True),
            nn.ReLU(),
            nn.Conv2d(i, o, 3, padding=1, bias=False),
            nn.BatchNorm2d(o),
        )

    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)),
        block(16, 32),
        block(32, 32),
        block(32, 64),
        nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)),
    )


def test_write_through_stores_the_prefix_output_even_when_the_step_writes_into_it(
    tmp_path, monkeypatch
):
    """A float32 cache used to store the very tensor the step trained on (encoding to
    float32 is a no-op), and the disk writer reads it later, on its own thread: a trainable
    stage starting with nn.Dropout(inplace=True) then changed the rows before they were
    stored. Here the writer is held back until each step has run. The stored rows must
    equal the frozen prefix's output, and a run reusing the cache must train as the run
    that wrote it."""
    import threading

    import prefast.store.disk_writer as disk_writer
    from prefast.store import CacheRoot, open_reader
    from prefast.store.manage import list_caches
    from prefast.training.trainer import Trainer

    steps = threading.Semaphore(0)
    train_threads: set[str] = set()
    init, to_storage, step = disk_writer.DiskWriter.__init__, disk_writer.to_storage, Trainer._step

    def tracked_init(self, root, spec, *args, **kw):
        init(self, root, spec, *args, **kw)
        if spec.attrs.get("split") == "train":
            train_threads.add(self.thread.name)

    def held_back(t, dtype):  # the writer thread reads a batch's rows after its step
        if threading.current_thread().name in train_threads:
            assert steps.acquire(timeout=30), "no step ran after the batch was written"
        return to_storage(t, dtype)

    def stepped(self, batch, it):
        loss = step(self, batch, it)
        steps.release()
        return loss

    monkeypatch.setattr(disk_writer.DiskWriter, "__init__", tracked_init)
    monkeypatch.setattr(disk_writer, "to_storage", held_back)
    monkeypatch.setattr(Trainer, "_step", stepped)
    train_ds, test_ds = digits_tensors()
    cfg = TrainConfig(mode="prefast", cache_dir=str(tmp_path), cache_tier="zarr", **CFG)
    tr = Trainer(cfg, model=inplace_net(), train_data=train_ds, test_data=test_ds)
    wrote = tr.run()
    root = CacheRoot(tmp_path)
    [cache] = [c for c in list_caches(root) if c["split"] == "train"]
    reader = open_reader(root, cache["key"])
    try:
        ids = torch.from_numpy(reader.ids().copy())
        stored = reader.read_rows(np.arange(reader.spec.rows))[0]
    finally:
        reader.close()
    x = torch.stack([train_ds[int(i)][0] for i in ids])
    with torch.no_grad():
        expected = tr.model.run_range(x, 0, cache["boundary"])
    assert torch.equal(stored, expected), "the stored rows are not the prefix's output"
    reused = train(cfg, model=inplace_net(), train_data=train_ds, test_data=test_ds)
    assert [e["write_s"] for e in reused["epochs"]][-1] == 0
    assert [e["train_loss"] for e in reused["epochs"]] == [e["train_loss"] for e in wrote["epochs"]]


def test_train_hands_your_model_back_as_you_passed_it_and_warns_only_when_asked(caplog):
    """Trained in place, with each parameter's requires_grad and each module's mode as
    given; augment is ignored silently for your data unless you set it."""
    from prefast import TrainConfig, train

    x = torch.randn(96, 1, 8, 8)
    y = torch.randint(0, 3, (96,))
    data = TensorDataset(x, y)
    seq = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
    )
    seq[2][2].bias.requires_grad_(False)  # the user's own choice, kept
    seq.eval()
    before = [p.detach().clone() for p in seq.parameters()]
    cfg = TrainConfig(mode="freezeout", epochs=3, batch_size=32, t0=0.3, device="cpu")
    with caplog.at_level("WARNING"):
        run = train(cfg, model=seq, train_data=data, test_data=data)
    assert run["epochs"][-1]["frozen_stages"] == 2  # the run froze stages 0 and 1 ...
    assert [p.requires_grad for p in seq.parameters()] == [True] * 7 + [False]  # ... handed back
    assert not any(m.training for m in seq.modules())  # eval, as passed
    assert any(not torch.equal(a, b) for a, b in zip(before, seq.parameters(), strict=True))
    assert run["config"]["augment"] == "none"
    assert not any("augment" in r.message for r in caplog.records)
    with caplog.at_level("WARNING"):
        train(cfg.replace(augment="standard", epochs=1), model=seq, train_data=data, test_data=data)
    assert any("augment='standard' is ignored" in r.message for r in caplog.records)


@pytest.mark.slow
def test_progress_into_a_pipe_prints_one_line_per_epoch(tmp_path):
    code = (
        "from prefast import TrainConfig, train\n"
        "train(TrainConfig(dataset='digits', model='densenet-bc', depth=10, epochs=2, "
        "device='cpu', mode='freezeout'), progress=True)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"], res.stderr
    assert "test acc" in lines[0] and "stages" in lines[0]


def test_a_head_wider_than_the_datas_classes_is_told_and_a_narrower_one_refused(caplog):
    """Through the API, a model whose head has more outputs than the data has classes (a
    library model's 1000-class head on 3 classes) trained without a word (before)."""
    import logging

    x = torch.randn(60, 1, 8, 8)
    data = TensorDataset(x, torch.arange(60) % 3)  # 3 classes
    cfg = TrainConfig(**{**CFG, "epochs": 1, "batch_size": 30})

    def net(outputs: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.Sequential(nn.Flatten(), nn.Linear(144, outputs))
        )

    with caplog.at_level(logging.WARNING):
        train(cfg, model=net(1000), train_data=data, test_data=data)
    (said,) = [r.getMessage() for r in caplog.records if "outputs but the data" in r.getMessage()]
    assert "head gives 1000 outputs but the data has 3 classes" in said
    assert "reset_classifier(3)" in said
    with pytest.raises(ConfigError, match="head gives 2 outputs but the data has 3 classes"):
        train(cfg, model=net(2), train_data=data, test_data=data)
