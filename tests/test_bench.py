"""The cost model and the benchmark arithmetic (pure functions, no training)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from prefast.benchmarks.store_bench import run_store_bench
from prefast.benchmarks.train_bench import OVERHEAD_PARTS, overhead_breakdown, summarize
from prefast.caching.costmodel import StageCost, plan_boundaries, predict_epochs
from prefast.freezing.schedule import FreezeOutSchedule

COSTS = [
    StageCost(fwd_s=0.01 * (i + 1), fwd_bwd_s=0.03 * (i + 1), out_row_bytes=64, out_shape=(16,))
    for i in range(4)
]


def test_baseline_prediction_is_every_stage_every_batch():
    sched = FreezeOutSchedule(4, 10 * 5, t0=1.0, scale="cubic", scale_lr=False, base_lr=0.1)
    per_epoch = predict_epochs("baseline", sched, 5, 10, COSTS, [], eval_batches=2)
    fb, fwd = sum(c.fwd_bwd_s for c in COSTS), sum(c.fwd_s for c in COSTS)
    assert [e["train_s"] for e in per_epoch] == pytest.approx([5 * fb] * 10)
    assert [e["eval_s"] for e in per_epoch] == pytest.approx([2 * fwd] * 10)


def test_prefast_never_predicted_slower_than_freezeout_and_skips_the_cached_prefix():
    sched = FreezeOutSchedule(4, 10 * 5, t0=0.5, scale="cubic", scale_lr=True, base_lr=0.1)
    bounds = plan_boundaries(sched, 5, 10, COSTS, rows=1000, write_bw=1e12, read_bw=1e12)
    assert bounds, "free I/O: some boundary must pay"
    fo = predict_epochs("freezeout", sched, 5, 10, COSTS, bounds, eval_batches=2)
    pf = predict_epochs("prefast", sched, 5, 10, COSTS, bounds, eval_batches=2)
    first = bounds[0]
    for e, (a, b) in enumerate(zip(fo, pf, strict=True)):
        if e <= first.epoch:  # nothing cached yet: the same work
            assert b == pytest.approx(a)
        else:
            assert b["train_s"] < a["train_s"] and b["eval_s"] < a["eval_s"]


def _run(wall, epochs, acc=0.9):
    """A run record shaped like Trainer.run()'s: epochs carry measured and ideal seconds."""
    recs = []
    for train_s, ideal_train, eval_s, ideal_eval, write_s, read_s in epochs:
        recs.append(
            dict(
                train_s=train_s,
                predicted_train_s=ideal_train,
                eval_s=eval_s,
                predicted_eval_s=ideal_eval,
                write_s=write_s,
                read_s=read_s,
                time_s=train_s + eval_s,
            )
        )
    ideal = sum(e["predicted_train_s"] + e["predicted_eval_s"] for e in recs)
    return {"epochs": recs, "final": {"wall_s": wall, "predicted_s": ideal, "test_acc": acc}}


def test_overhead_parts_add_up_to_measured_minus_ideal():
    run = _run(
        wall=10.0,
        epochs=[(3, 2.8, 1, 1, 0, 0), (2.5, 2, 1, 0.9, 0.3, 0), (1, 0.5, 0.2, 0.2, 0, 0.1)],
    )
    parts = overhead_breakdown(run)
    assert set(parts) == set(OVERHEAD_PARTS)
    assert parts["write_epochs"] == pytest.approx(0.5)
    assert parts["read_epochs"] == pytest.approx(0.5)
    assert parts["compute_epochs"] == pytest.approx(0.2)
    assert parts["eval"] == pytest.approx(0.1)
    assert parts["setup"] == pytest.approx(10.0 - 8.7)
    assert sum(parts.values()) == pytest.approx(
        run["final"]["wall_s"] - run["final"]["predicted_s"]
    )


def test_speedups_are_per_seed_ratios_against_that_seeds_baseline():
    base = [_run(10.0, [(9, 9, 1, 1, 0, 0)]), _run(20.0, [(19, 19, 1, 1, 0, 0)])]
    fo = [_run(5.0, [(4, 4, 1, 1, 0, 0)]), _run(10.0, [(9, 9, 1, 1, 0, 0)])]
    pf = [_run(4.0, [(3, 3, 1, 1, 0, 0)]), _run(5.0, [(4, 4, 1, 1, 0, 0)])]
    rows = summarize(
        base, {0.5: [{"freezeout": f, "prefast": p} for f, p in zip(fo, pf, strict=True)]}
    )
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["baseline"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert by_mode["freezeout"]["speedup_vs_baseline"] == pytest.approx(2.0)
    assert by_mode["freezeout"]["speedup_vs_baseline_std"] == pytest.approx(0.0)
    # (5/4 + 10/5) / 2, not the ratio of mean walls (7.5/4.5)
    assert by_mode["prefast"]["speedup_vs_freezeout"] == pytest.approx(1.625)
    assert by_mode["prefast"]["wall_s"] == pytest.approx(4.5)


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_store_bench_keeps_every_trial_and_its_mean(tmp_path):
    doc = run_store_bench(2 * 2**20, directory=tmp_path, trials=2, log=lambda *_: None)
    assert {(r["tier"], r["codec"]) for r in doc["results"]} >= {("ram", "none"), ("zarr", "zstd")}
    for row in doc["results"]:
        for m in ("write", "read"):
            trials = row[f"{m}_trials_mb_s"]
            assert len(trials) == 2 and all(v > 0 for v in trials)
            # the trials are kept to 0.1 MB/s: a slow disk's few MB/s differ by that rounding
            assert row[f"{m}_mb_s"] == pytest.approx(np.mean(trials), rel=1e-3, abs=0.051)
    assert list(tmp_path.iterdir()) == [], "the benchmark's scratch files must be removed"


@pytest.mark.slow  # make check (make test's bound: docs/development.md)
def test_store_bench_measures_eight_bit_rows_against_their_own_zstd_floor(tmp_path):
    doc = run_store_bench(
        2 * 2**20, directory=tmp_path, log=lambda *_: None, dtypes=("float16", "int8")
    )
    rows = {(r["tier"], r["codec"], r["dtype"]): r for r in doc["results"]}
    assert rows["mmap", "none", "int8"]["row_bytes"] == 64 * 8 + 64 * 16 * 16
    assert rows["mmap", "none", "float16"]["row_bytes"] == 64 * 16 * 16 * 2
    for dtype in ("float16", "int8"):
        zstd = rows["zarr", "zstd", dtype]
        assert zstd["read_floor"] == "zstd_chunk_read_mb_s"
        assert zstd["read_vs_floor"] == pytest.approx(zstd["read_mb_s"] / zstd["read_floor_mb_s"])
    # each dtype's zstd tier against the minimal reader of its own chunk files
    floors = {d: rows["zarr", "zstd", d]["read_floor_mb_s"] for d in ("float16", "int8")}
    assert floors["float16"] != floors["int8"]


def test_codec_table_errors_and_the_best_bit_rounding():
    from prefast.benchmarks.cache_dtype_bench import best_bitround, codec_table, summary_rows

    acts = torch.relu(torch.randn(64, 8, 6, 6, generator=torch.Generator().manual_seed(0)))
    rows = {r["codec"]: r for r in codec_table(acts.numpy())}
    assert rows["float32"]["rel_error"] == 0.0
    errors = [rows[f"bitround{n}"]["rel_error"] for n in range(1, 10)]
    assert errors == sorted(errors, reverse=True)  # each kept bit halves the error
    best = best_bitround(list(rows.values()))
    assert rows[best]["rel_error"] <= rows["int8"]["rel_error"]
    assert all(rows[f"bitround{n}"]["bytes_per_value"] >= rows[best]["bytes_per_value"]
               for n in range(int(best[-1]), 10))  # fmt: skip
    doc = {"runs": {"freezeout": [{"test_acc": 0.9, "wall_s": 2, "cache_bytes": 0,
                                   "bytes_per_value": None}] * 2,
                    "prefast int8": [{"test_acc": a, "wall_s": 1, "cache_bytes": 10,
                                      "bytes_per_value": 1.1} for a in (0.8, 0.9)]}}  # fmt: skip
    int8 = next(r for r in summary_rows(doc) if r["variant"] == "prefast int8")
    assert int8["delta"] == pytest.approx(-0.05)  # paired by seed with freezeout


def _wheel(folder, filename: str, requires: list[str]) -> None:
    import zipfile

    name, version = filename.split("-")[:2]
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / filename, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_the_gpu_check_dry_run_checks_its_wheels_and_states_its_budget(tmp_path):
    """benchmarks/gpu_check.sh --dry-run, with wheels built here to the pinned versions."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    pins = dict(
        re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (root / "constraints.txt").read_text(), re.M)
    )
    linux = "cp312-cp312-manylinux_2_17_x86_64"
    wheels = {
        "zarr": ("py3-none-any", ["numcodecs>=0.14", "donfig>=0.8", "google-crc32c>=1.5",
                                  "numpy>=2.0", "packaging>=22.0"]),
        "numcodecs": (linux, ["numpy>=1.24", "typing_extensions", 'pywin32; sys_platform=="win32"']),
        "crc32c": (linux, []),
        "donfig": ("py3-none-any", ["pyyaml"]),
        "google_crc32c": (linux, []),
    }  # fmt: skip

    def dry_run():
        env = {"PREFAST_WHEELS": str(tmp_path), "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
        cmd = [str(root / "benchmarks" / "gpu_check.sh"), "--dry-run"]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)

    for name, (tags, requires) in wheels.items():
        version = pins[name.replace("_", "-")]
        _wheel(tmp_path, f"{name}-{version}-{tags}.whl", requires)
    ok = dry_run()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "budget 420s of wall-clock" in ok.stdout and "pytest -m cuda" in ok.stdout
    assert "gpu_full.{json,md,png}" in ok.stdout

    (tmp_path / f"crc32c-{pins['crc32c']}-{linux}.whl").unlink()
    _wheel(tmp_path, f"crc32c-{pins['crc32c']}-cp312-cp312-manylinux_2_17_aarch64.whl", [])
    _wheel(tmp_path, f"donfig-{pins['donfig']}-py3-none-any.whl", ["pyyaml", "leftpad"])
    bad = dry_run()
    assert bad.returncode == 1
    assert "crc32c-2.9.post0-cp312-cp312-manylinux_2_17_aarch64.whl: not for CPython 3.12" in (
        bad.stdout
    )
    assert "leftpad (needed by donfig) is neither carried nor on the image" in bad.stdout
    assert "make gpu-wheels" in bad.stdout


def test_image_folders_hold_every_image_once_in_its_codec(tmp_path):
    from PIL import Image

    from prefast.benchmarks.imagefolder_bench import write_digits_folder

    for codec, ext in (("png", "png"), ("jpeg", "jpg")):
        root = write_digits_folder(tmp_path / codec, 24, codec, train_images=100)
        train = sorted(root.glob("train/*/*"))
        val = sorted(root.glob("val/*/*"))
        assert len(train) == 100 and len(val) == 297 and {p.suffix for p in train} == {f".{ext}"}
        names = {p.name for p in train}
        assert not names & {p.name for p in val}, "an image in both splits"
        with Image.open(train[0]) as img:
            assert img.size == (24, 24) and img.mode == "RGB" and img.format == codec.upper()
        assert write_digits_folder(root, 24, codec, train_images=100) == root  # made once


def test_the_image_folder_time_split_adds_up_to_the_wall_clock():
    from prefast.benchmarks.imagefolder_bench import PARTS, time_split

    keys = ("train_s", "eval_s", "time_s", "write_s", "read_s", "data_s")
    epochs = [
        dict(zip(keys, (4.0, 1.0, 5.0, 0.5, 0.0, 1.0), strict=True)),
        dict(zip(keys, (2.0, 0.5, 2.5, 0.0, 0.2, 0.0), strict=True)),
    ]
    parts = time_split({"epochs": epochs, "final": {"wall_s": 8.0}})
    assert list(parts) == list(PARTS)
    assert parts["compute"] == pytest.approx(6.0 - 0.5 - 0.2 - 1.0)
    assert parts["setup"] == pytest.approx(0.5) and sum(parts.values()) == pytest.approx(8.0)


def test_the_demo_says_where_its_accuracy_gaps_come_from_with_its_own_numbers():
    from prefast.training.compare import accuracy_notes

    def run(acc: float, cached: int = 0) -> dict:
        epochs = [{"cached_batches": 32 if e < cached else 0} for e in range(5)]
        final = {"test_acc": acc, "batches_per_epoch": 32, "freeze_iters": [20, 60, 100]}
        cfg = {"epochs": 5, "t0": 0.5, "scale": "cubic"}
        return {"config": cfg, "epochs": epochs, "final": {**final, "cache_dtype": "float16"}}

    notes = "\n".join(
        accuracy_notes({"baseline": run(0.99), "freezeout": run(0.9415), "prefast": run(0.941, 2)})
    )
    assert "prefast - freezeout test accuracy: -0.0005, what the float16 cache changed" in notes
    assert "(2 of 5 epochs read it)" in notes
    assert "freezeout - baseline: -0.0485, FreezeOut's schedule, not the cache" in notes
    assert "first stage freezes at iteration 20 of 160 (12%)" in notes
    assert "meas/pred" in notes


def test_the_demo_prints_the_measured_t0_trade_off_from_the_committed_results(capsys):
    from prefast.benchmarks.tradeoff import main, rows

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "train_subset.md"
    assert main(str(path)) == 0
    out = capsys.readouterr().out
    prefast_rows = {
        t0: cells for (t0, mode), cells in rows(path.read_text()).items() if mode == "prefast"
    }
    assert len(prefast_rows) >= 2  # a trade-off needs two settings of t0
    for t0, cells in prefast_rows.items():
        assert f"--t0 {t0}: prefast {cells[3]} vs baseline, test acc {cells[5]}" in out


@pytest.mark.parametrize(
    ("iters", "freeze", "says"),
    [
        # --freeze-prefix 9 of 10 stages, the head to the end (before: "the first stage
        # freezes at iteration 30 of 30")
        (
            [0] * 9 + [30],
            "freezeout",
            "stages 0-8 are frozen from iteration 0 (--freeze-prefix 9) and no other stage "
            "freezes before the end (iteration 30)",
        ),
        (
            [0, 0, 12, 30],
            "freezeout",
            "stages 0-1 are frozen from iteration 0 (--freeze-prefix 2) and the first stage after "
            "them freezes at iteration 12 of 30 (40%)",
        ),
        # --freeze auto that froze nothing (before: "froze stage 3 at iteration 30 of 30")
        (
            [30, 30, 30, 30],
            "auto",
            "no stage freezes before the end (iteration 30) under --freeze auto",
        ),
        (
            [9, 30, 30, 30],
            "auto",
            "the first stage freezes at iteration 9 of 30 (30%) under --freeze auto",
        ),
    ],
)
def test_compares_summary_says_when_the_first_stage_froze_right(iters, freeze, says):
    from prefast.training.compare import accuracy_notes

    def run(acc: float) -> dict:
        final = {"test_acc": acc, "batches_per_epoch": 10, "freeze_iters": iters}
        cfg = {"epochs": 3, "t0": 0.5, "scale": "cubic", "freeze": freeze}
        return {"config": cfg, "epochs": [], "final": final}

    notes = " ".join(accuracy_notes({"baseline": run(0.9), "freezeout": run(0.8)}))
    assert says in notes, notes


def test_compare_does_not_say_normalize_imagenet_is_ignored_when_it_applies_it(capsys, caplog):
    """compare loads the data by name once (normalized as asked), then passes it to each
    run; the run took it for a user's own dataset and warned (before)."""
    from helpers import cli_in_process

    res = cli_in_process(capsys, caplog, "compare", "--modes", "freezeout", "--dataset",
                         "digits", "--model", "densenet-bc", "--depth", "10", "--epochs", "1",
                         "--normalize", "imagenet", "--device", "cpu")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "is ignored" not in res.stderr, res.stderr
