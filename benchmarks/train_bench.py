"""Training benchmark: modes x t0 x seeds, side by side in one process.

Claim under test: prefast is faster than freezeout, which is faster than
baseline, at no cost in accuracy from the cache itself. Prints and writes
wall-clock, speedups, test accuracy (mean ± std over seeds), measured/ideal
with the overhead broken down, and the cache tier; then plots test error
against wall-clock (FreezeOut's Figure 2 style).

Baseline does not depend on t0 (it never freezes), so it runs once per seed;
each seed's freezeout and prefast runs follow it in the same process, and
speedups are per-seed ratios against that seed's baseline.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

from prefast.benchmarks.plotting import panels, save
from prefast.config import TrainConfig
from prefast.training.build import built_in_augment
from prefast.training.compare import compare

OVERHEAD_PARTS = ("setup", "write_epochs", "read_epochs", "compute_epochs", "eval")


def _ms(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def overhead_breakdown(run: dict) -> dict[str, float]:
    """Measured minus ideal seconds of one run, by where they were spent.

    ``write_epochs`` are epochs that wrote a cache, ``read_epochs`` epochs that
    only read one, ``compute_epochs`` the rest (training part only); ``eval`` is
    every evaluation (including writing the test cache); ``setup`` is wall-clock
    outside the epochs (the prefast feed's stage timing probe, for one).
    """
    parts = dict.fromkeys(OVERHEAD_PARTS, 0.0)
    for e in run["epochs"]:
        if e.get("write_s", 0) > 0:
            kind = "write_epochs"
        elif e.get("read_s", 0) > 0:
            kind = "read_epochs"
        else:
            kind = "compute_epochs"
        parts[kind] += e["train_s"] - e["predicted_train_s"]
        parts["eval"] += e["eval_s"] - e["predicted_eval_s"]
    parts["setup"] = run["final"]["wall_s"] - sum(e["time_s"] for e in run["epochs"])
    return parts


def _row(t0: float | None, mode: str, recs: list[dict], baselines: list[dict]) -> dict:
    walls = [r["final"]["wall_s"] for r in recs]
    events = [
        e for r in recs for e in r["final"].get("cache_events", []) if e["event"] == "boundary"
    ]
    parts = [overhead_breakdown(r) for r in recs]
    row = {
        "t0": t0,
        "mode": mode,
        "seeds": len(recs),
        "wall_s": _ms(walls)[0],
        "wall_std": _ms(walls)[1],
        "test_acc": _ms([r["final"]["test_acc"] for r in recs])[0],
        "test_acc_std": _ms([r["final"]["test_acc"] for r in recs])[1],
        "predicted_s": _ms([r["final"]["predicted_s"] for r in recs])[0],
        "measured_over_ideal": _ms(
            [r["final"]["wall_s"] / r["final"]["predicted_s"] for r in recs]
        )[0],
        "overhead_s": {k: _ms([p[k] for p in parts])[0] for k in OVERHEAD_PARTS},
        "cache_tiers": sorted({e["tier"] for e in events}),
        "cache_bytes_max": max((e["bytes"] for e in events), default=0),
    }
    if baselines:
        per_seed = [b["final"]["wall_s"] / w for b, w in zip(baselines, walls, strict=True)]
        row["speedup_vs_baseline"], row["speedup_vs_baseline_std"] = _ms(per_seed)
    return row


def summarize(baselines: list[dict], runs: dict[float, list[dict[str, dict]]]) -> list[dict]:
    """Rows: baseline over seeds, then (t0, mode) over seeds with per-seed speedups."""
    rows = [_row(None, "baseline", baselines, baselines)] if baselines else []
    for t0, per_seed in runs.items():
        for mode in per_seed[0]:
            row = _row(t0, mode, [r[mode] for r in per_seed], baselines)
            if mode != "freezeout" and "freezeout" in per_seed[0]:
                ratios = [
                    r["freezeout"]["final"]["wall_s"] / r[mode]["final"]["wall_s"] for r in per_seed
                ]
                row["speedup_vs_freezeout"], row["speedup_vs_freezeout_std"] = _ms(ratios)
            rows.append(row)
    return rows


def _x(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x ± {row[key + '_std']:.2f}" if key in row else "-"


def markdown(rows: list[dict], cfg: TrainConfig, machine: dict, seeds: list[int]) -> str:
    cfg = built_in_augment(cfg)  # the augmentation the runs had, not "auto"
    head = (
        f"Training benchmark: {cfg.model} depth {cfg.depth} k={cfg.growth_rate} on {cfg.dataset}"
        f"{f' subset {cfg.subset}' if cfg.subset else ''}, {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"{cfg.scale} scaling, augment {cfg.augment}, cache views {cfg.cache_views}; seeds {seeds}; "
        f"{machine['cores']} cores ({machine.get('cpu', '?')}), GPU {machine['gpu']}, torch {machine['torch']}. "
        "Mean ± std over seeds; speedups are per-seed ratios measured side by side.\n\n"
    )
    lines = [
        "| t0 | mode | wall s | vs baseline | vs freezeout | test acc | measured/ideal | cache |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cache = ",".join(r["cache_tiers"]) or "-"
        if r["cache_bytes_max"]:
            cache += f" ({r['cache_bytes_max'] / 2**20:.0f} MiB)"
        lines.append(
            f"| {r['t0'] if r['t0'] is not None else '-'} | {r['mode']} | {r['wall_s']:.1f} ± {r['wall_std']:.1f} "
            f"| {_x(r, 'speedup_vs_baseline')} | {_x(r, 'speedup_vs_freezeout')} "
            f"| {r['test_acc']:.4f} ± {r['test_acc_std']:.4f} | {r['measured_over_ideal']:.2f} | {cache} |"
        )
    lines += [
        "",
        "Measured minus ideal seconds (mean over seeds; negative = faster than the cost model):",
        "",
        "| t0 | mode | ideal s | " + " | ".join(OVERHEAD_PARTS) + " |",
        "|---|---|---:|" + "---:|" * len(OVERHEAD_PARTS),
    ]
    for r in rows:
        t0 = r["t0"] if r["t0"] is not None else "-"
        parts = " | ".join(f"{r['overhead_s'][k]:+.2f}" for k in OVERHEAD_PARTS)
        lines.append(f"| {t0} | {r['mode']} | {r['predicted_s']:.1f} | {parts} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    fig, (ax,) = panels(1, 6, 4)
    for mode, marker in (("baseline", "s"), ("freezeout", "o"), ("prefast", "^")):
        pts = [r for r in rows if r["mode"] == mode]
        if not pts:
            continue
        ax.errorbar(
            [r["wall_s"] for r in pts],
            [100 * (1 - r["test_acc"]) for r in pts],
            xerr=[r["wall_std"] for r in pts],
            yerr=[100 * r["test_acc_std"] for r in pts],
            fmt=marker,
            label=mode,
            capsize=3,
        )
        for r in pts:
            if r["t0"] is not None:
                ax.annotate(f"{r['t0']}", (r["wall_s"], 100 * (1 - r["test_acc"])), fontsize=7)
    ax.set_xlabel("wall-clock (s)")
    ax.set_ylabel("test error (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="labels: t0", fontsize=8, title_fontsize=8)
    save(fig, path)


def run_sweep(
    cfg: TrainConfig,
    t0s: list[float],
    seeds: list[int],
    modes: list[str],
    out: str,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every (seed, t0, mode), write ``out``.json/.md/.png, return the document."""
    from prefast.benchmarks.store_bench import machine

    baselines: list[dict] = []
    runs: dict[float, list[dict[str, dict]]] = {}
    for seed in seeds:
        for i, t0 in enumerate(t0s):
            todo = [m for m in modes if m != "baseline" or i == 0]
            log(f"=== seed={seed} t0={t0} {','.join(todo)} ===")
            res = compare(cfg.replace(t0=t0, seed=seed), todo)
            for m, r in res.items():
                f = r["final"]
                log(
                    f"  {m:<10} wall {f['wall_s']:.1f}s ideal {f['predicted_s']:.1f}s acc {f['test_acc']:.4f}"
                )
            if "baseline" in res:
                baselines.append(res.pop("baseline"))
            if res:
                runs.setdefault(t0, []).append(res)
    rows = summarize(baselines, runs)
    doc = {
        "machine": machine(),
        "config": cfg.to_json(),
        "seeds": seeds,
        "t0_values": t0s,
        "rows": rows,
        "runs": {
            "baseline": [{"final": r["final"], "epochs": r["epochs"]} for r in baselines],
            **{
                str(t0): [
                    {m: {"final": r["final"], "epochs": r["epochs"]} for m, r in res.items()}
                    for res in per
                ]
                for t0, per in runs.items()
            },
        },
    }
    md = markdown(rows, cfg, doc["machine"], seeds)
    log(md)
    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    base.with_suffix(".md").write_text(md)
    title = f"{cfg.dataset}{f' subset {cfg.subset}' if cfg.subset else ''} {cfg.model}-{cfg.depth}: error vs wall-clock"
    plot(rows, base.with_suffix(".png"), title)
    return doc


def accuracy_table(docs: dict[str, dict]) -> str:
    """One markdown table of test accuracy per (setting, mode) from several sweeps."""
    lines = [
        "| setting | mode | seeds | test acc (mean ± std) | min | max |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, doc in docs.items():
        for row in doc["rows"]:
            accs = _accuracies(doc, row)
            lines.append(
                f"| {label} | {row['mode']} | {row['seeds']} | {row['test_acc']:.4f} ± "
                f"{row['test_acc_std']:.4f} | {min(accs):.4f} | {max(accs):.4f} |"
            )
    return "\n".join(lines) + "\n"


def _accuracies(doc: dict, row: dict) -> list[float]:
    if row["mode"] == "baseline":
        return [r["final"]["test_acc"] for r in doc["runs"]["baseline"]]
    return [r[row["mode"]]["final"]["test_acc"] for r in doc["runs"][str(row["t0"])]]
