"""Feature-space augmentation benchmark: can ops on cached features replace K views?

With ``--augment standard`` and one cached view per boundary, every epoch after
a boundary trains on the same crops and flips of the frozen prefix's input.
Per setting (dataset x model) and t0 (0.5 and 0.7: more of the run after the
freeze at lower t0), over seeds, this trains side by side:

- freezeout: full input augmentation every epoch (the reference);
- prefast, one view; prefast, four views (``--cache-views 4``);
- prefast, one view plus each op of ``--feature-augment`` alone (shift, flip, mix);
- prefast, one view plus the best combination: the two ops that did best on
  their own in this cell (highest mean accuracy over one view), leaving out an op
  that changed nothing (shift on maps under 8 pixels: every seed's losses equal
  one view's).

Every boundary is cached (``--cache-boundaries every``) so that the variants of
a cell read the same boundaries and differ only in what they vary.

Per run: test accuracy, wall-clock, the bytes its caches take on disk, and the
seconds the ops took (``feature_s`` over ``feature_batches``: milliseconds per
batch on this machine's CPU).
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

from prefast.benchmarks.imagefolder_bench import write_digits_folder
from prefast.benchmarks.plotting import panels, save
from prefast.benchmarks.train_bench import _ms as mean_std
from prefast.config import FEATURE_OPS as OPS
from prefast.config import TrainConfig
from prefast.store import CacheRoot
from prefast.store.manage import list_caches
from prefast.training.trainer import train

T0S = (0.5, 0.7)


@dataclass(frozen=True)
class Setting:
    name: str  # digits | synthetic | digits-folder-32px

    def config(self, quick: bool, cache: str) -> TrainConfig:
        common = dict(
            mode="prefast", batch_size=64, augment="standard", device="cpu", cache_dir=cache,
            cache_tier="ram", cache_boundaries="every",
        )  # fmt: skip
        if self.name == "digits":
            return TrainConfig(
                dataset="digits", model="densenet-bc", depth=10 if quick else 16, growth_rate=12,
                epochs=6 if quick else 15, **common,  # type: ignore[arg-type]
            )  # fmt: skip
        if self.name == "synthetic":
            return TrainConfig(
                dataset="synthetic", synthetic_size=(50_000, 1_000), subset=1000,
                model="densenet-bc", depth=16, growth_rate=12, epochs=8,
                **common,  # type: ignore[arg-type]
            )  # fmt: skip
        # torchvision's ResNet-18 on image files read through a DataLoader
        folder = write_digits_folder(Path(cache).parent / "digits-folder-32px-png", 32, "png")
        return TrainConfig(
            dataset="imagefolder", data_dir=str(folder), image_size=32, model="resnet18",
            epochs=8, workers=0, **common,  # type: ignore[arg-type]
        )  # fmt: skip


def variants(single: dict[str, float | None] | None = None) -> list[tuple[str, str, dict]]:
    """(name, mode, config changes); with ``single`` (op -> mean gain over one view, None
    for an op that changed nothing), the best combination (none if fewer than two ops
    did something)."""
    if single is not None:
        effective = [op for op in OPS if single[op] is not None]
        best = sorted(effective, key=lambda op: -single[op])[:2]  # type: ignore[operator]
        ops = [op for op in OPS if op in best]  # in the order they run
        if len(ops) < 2:
            return []
        return [(f"1 view + {'+'.join(ops)}", "prefast", {"feature_augment": ",".join(ops)})]
    return [
        ("freezeout", "freezeout", {}),
        ("1 view", "prefast", {}),
        ("4 views", "prefast", {"cache_views": 4}),
        *((f"1 view + {op}", "prefast", {"feature_augment": op}) for op in OPS),
    ]


def run_one(cfg: TrainConfig) -> dict:
    root = Path(cfg.cache_dir or "")
    shutil.rmtree(root, ignore_errors=True)
    run = train(cfg)
    caches = [c for c in list_caches(CacheRoot(root)) if c["status"] == "complete"]
    shutil.rmtree(root, ignore_errors=True)
    epochs = run["epochs"]
    secs = sum(e.get("feature_s", 0.0) for e in epochs)
    batches = sum(e.get("feature_batches", 0) for e in epochs)
    return {
        "test_acc": run["final"]["test_acc"],
        "losses": [e["train_loss"] for e in epochs],
        "wall_s": run["final"]["wall_s"],
        "cache_peak_bytes": run["final"].get("cache_peak_bytes", 0),  # freezeout: none
        "disk_bytes_left": sum(c["bytes"] for c in caches),
        "feature_ms_per_batch": 1e3 * secs / batches if batches else None,
        "cached_epochs": sum(e["cached_batches"] > 0 for e in epochs),
    }


def run_cell(s: Setting, t0: float, seeds: list[int], quick: bool, cache: str) -> dict:
    cfg = s.config(quick, str(Path(cache) / "feature_augment")).replace(t0=t0)
    runs: dict[str, list[dict]] = {}

    def go(name: str, mode: str, changes: dict) -> None:
        for seed in seeds:
            r = run_one(cfg.replace(mode=mode, seed=seed, **changes))
            runs.setdefault(name, []).append({"seed": seed, **r})
            print(f"  {s.name} t0 {t0} seed {seed} {name}: acc {r['test_acc']:.4f} "
                  f"wall {r['wall_s']:.1f}s", flush=True)  # fmt: skip

    for v in variants():
        go(*v)
    one = runs["1 view"]
    base = statistics.mean(r["test_acc"] for r in one)
    single: dict[str, float | None] = {}
    for op in OPS:
        mine = runs[f"1 view + {op}"]
        same = all(r["losses"] == o["losses"] for r, o in zip(mine, one, strict=True))
        single[op] = None if same else statistics.mean(r["test_acc"] for r in mine) - base
    for v in variants(single):
        go(*v)
    no_effect = [op for op in OPS if single[op] is None]
    return {"setting": s.name, "t0": t0, "config": cfg.to_json(), "runs": runs,
            "no_effect": no_effect}  # fmt: skip


def summary_rows(cell: dict) -> list[dict]:
    fo, one = cell["runs"]["freezeout"], cell["runs"]["1 view"]
    out = []
    for name, runs in cell["runs"].items():
        acc, acc_std = mean_std([r["test_acc"] for r in runs])
        vs_fo = mean_std([r["test_acc"] - f["test_acc"] for r, f in zip(runs, fo, strict=True)])
        vs_one = mean_std([r["test_acc"] - o["test_acc"] for r, o in zip(runs, one, strict=True)])
        wall, wall_std = mean_std([r["wall_s"] for r in runs])
        ms = [r["feature_ms_per_batch"] for r in runs if r["feature_ms_per_batch"] is not None]
        out.append({
            "variant": name, "seeds": len(runs), "test_acc": acc, "test_acc_std": acc_std,
            "vs_freezeout": vs_fo[0], "vs_freezeout_std": vs_fo[1],
            "vs_one_view": vs_one[0], "vs_one_view_std": vs_one[1],
            "wall_s": wall, "wall_std": wall_std,
            "cache_mib": max(r["cache_peak_bytes"] for r in runs) / 2**20,
            "ms_per_batch": statistics.mean(ms) if ms else None,
            "no_effect": name.removeprefix("1 view + ") in cell.get("no_effect", []),
            "cached_epochs": statistics.mean(r["cached_epochs"] for r in runs),
        })  # fmt: skip
    return out


def markdown(cells: list[dict]) -> str:
    lines = []
    for cell in cells:
        c = cell["config"]
        model = f"{c['model']}" + (f" depth {c['depth']}" if c["model"] == "densenet-bc" else "")
        lines += [
            f"### {cell['setting']}, t0 {cell['t0']}",
            "",
            f"{model}, {c['epochs']} epochs, `--augment standard`, RAM tier, every boundary; "
            f"{len(cell['runs']['freezeout'])} seeds; differences paired by seed.",
            "",
            "| variant | test acc | vs freezeout | vs 1 view | cache MiB (peak) | wall s "
            "| ops ms/batch | cached epochs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in summary_rows(cell):
            ms = "-" if r["ms_per_batch"] is None else f"{r['ms_per_batch']:.2f}"
            note = " (no effect: every seed's losses equal 1 view's)" if r["no_effect"] else ""
            lines.append(
                f"| {r['variant']}{note} | {r['test_acc']:.4f} ± {r['test_acc_std']:.4f} "
                f"| {r['vs_freezeout']:+.4f} ± {r['vs_freezeout_std']:.4f} "
                f"| {r['vs_one_view']:+.4f} ± {r['vs_one_view_std']:.4f} | {r['cache_mib']:.1f} "
                f"| {r['wall_s']:.1f} ± {r['wall_std']:.1f} | {ms} | {r['cached_epochs']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(cells: list[dict], path: Path) -> None:
    fig, axes = panels(len(cells), 3.6, 4.0)
    for ax, cell in zip(axes, cells, strict=True):
        rows = [r for r in summary_rows(cell) if r["variant"] != "freezeout"]
        y = range(len(rows))
        ax.errorbar([r["vs_freezeout"] for r in rows], list(y),
                    xerr=[r["vs_freezeout_std"] for r in rows], fmt="o", capsize=3)  # fmt: skip
        ax.axvline(0.0, color="grey", ls="--", lw=1)
        ax.set_yticks(list(y), [r["variant"] for r in rows], fontsize=7)
        ax.set_xlabel("test acc - freezeout's (same seed)", fontsize=8)
        ax.set_title(f"{cell['setting']}, t0 {cell['t0']}", fontsize=9)
    save(fig, path)


def run_feature_augment_bench(out: Path, cache: str, quick: bool) -> list[Path]:
    names = ["digits"] if quick else ["digits", "synthetic", "digits-folder-32px"]
    seeds = [0] if quick else [0, 1, 2, 3, 4]
    t0s = T0S[:1] if quick else T0S
    cells = []
    prefix = out / "feature_augment"
    for name in names:
        for t0 in t0s:
            print(f"feature_augment: {name}, t0 {t0}", flush=True)
            cells.append(run_cell(Setting(name), t0, seeds, quick, cache))
            # every file after every cell: a run stopped early keeps what it measured
            prefix.with_suffix(".json").write_text(json.dumps(cells, indent=1, default=str))
            prefix.with_suffix(".md").write_text(markdown(cells))
            plot(cells, prefix.with_suffix(".png"))
    print(markdown(cells))
    return [prefix.with_suffix(ext) for ext in (".json", ".md", ".png")]
