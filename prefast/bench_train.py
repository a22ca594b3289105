"""Training benchmark: modes x t0 x seeds, side by side in one process.

Claim under test: prefast is faster than freezeout, which is faster than
baseline, at no cost in accuracy from the cache itself. Prints and writes
wall-clock, speedups, test accuracy (mean ± std over seeds), measured/ideal
and the cache tier, then plots test error against wall-clock (FreezeOut's
Figure 2 style).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from prefast.compare import compare
from prefast.config import TrainConfig


def _ms(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(runs: dict[float, list[dict[str, dict]]]) -> list[dict]:
    """One row per (t0, mode) over seeds."""
    rows = []
    for t0, per_seed in runs.items():
        walls = {m: _ms([r[m]["final"]["wall_s"] for r in per_seed]) for m in per_seed[0]}
        for mode in per_seed[0]:
            recs = [r[mode] for r in per_seed]
            accs = _ms([r["final"]["test_acc"] for r in recs])
            ratio = _ms([r["final"]["wall_s"] / r["final"]["predicted_s"] for r in recs])
            events = [
                e
                for r in recs
                for e in r["final"].get("cache_events", [])
                if e["event"] == "boundary"
            ]
            rows.append(
                {
                    "t0": t0,
                    "mode": mode,
                    "seeds": len(recs),
                    "wall_s": walls[mode][0],
                    "wall_std": walls[mode][1],
                    "speedup_vs_baseline": walls["baseline"][0] / walls[mode][0]
                    if "baseline" in walls
                    else None,
                    "speedup_vs_freezeout": walls["freezeout"][0] / walls[mode][0]
                    if "freezeout" in walls
                    else None,
                    "test_acc": accs[0],
                    "test_acc_std": accs[1],
                    "measured_over_ideal": ratio[0],
                    "cache_tiers": sorted({e["tier"] for e in events}),
                    "cache_bytes_max": max((e["bytes"] for e in events), default=0),
                }
            )
    return rows


def markdown(rows: list[dict], cfg: TrainConfig, machine: dict) -> str:
    head = (
        f"Training benchmark: {cfg.model} depth {cfg.depth} k={cfg.growth_rate} on {cfg.dataset}"
        f"{f' subset {cfg.subset}' if cfg.subset else ''}, {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"{cfg.scale} scaling, augment {cfg.augment}; {machine['cores']} cores, GPU {machine['gpu']}, "
        f"torch {machine['torch']}.\n\n"
    )
    lines = [
        "| t0 | mode | seeds | wall s | vs baseline | vs freezeout | test acc | measured/ideal | cache |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        sb = f"{r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] else "-"
        sf = f"{r['speedup_vs_freezeout']:.2f}x" if r["speedup_vs_freezeout"] else "-"
        cache = ",".join(r["cache_tiers"]) or "-"
        if r["cache_bytes_max"]:
            cache += f" ({r['cache_bytes_max'] / 2**20:.0f} MiB)"
        lines.append(
            f"| {r['t0']} | {r['mode']} | {r['seeds']} | {r['wall_s']:.1f} ± {r['wall_std']:.1f} | {sb} | "
            f"{sf} | {r['test_acc']:.4f} ± {r['test_acc_std']:.4f} | {r['measured_over_ideal']:.2f} | {cache} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, marker in (("baseline", "s"), ("freezeout", "o"), ("prefast", "^")):
        pts = [r for r in rows if r["mode"] == mode]
        if not pts:
            continue
        ax.errorbar(
            [r["wall_s"] for r in pts],
            [1 - r["test_acc"] for r in pts],
            xerr=[r["wall_std"] for r in pts],
            yerr=[r["test_acc_std"] for r in pts],
            fmt=marker,
            label=mode,
            capsize=3,
        )
        if mode != "baseline":
            for r in pts:
                ax.annotate(f"t0={r['t0']}", (r["wall_s"], 1 - r["test_acc"]), fontsize=7)
    ax.set_xlabel("wall-clock (s)")
    ax.set_ylabel("test error")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sweep(
    cfg: TrainConfig, t0s: list[float], seeds: list[int], modes: list[str], out: str, log=print
) -> dict:  # type: ignore[no-untyped-def]
    from prefast.store.bench import machine

    runs: dict[float, list[dict[str, dict]]] = {}
    for t0 in t0s:
        for seed in seeds:
            log(f"=== t0={t0} seed={seed} ===")
            res = compare(cfg.replace(t0=t0, seed=seed), modes)
            for m, r in res.items():
                log(f"  {m:<10} wall {r['final']['wall_s']:.1f}s acc {r['final']['test_acc']:.4f}")
            runs.setdefault(t0, []).append(res)
    rows = summarize(runs)
    doc = {
        "machine": machine(),
        "config": cfg.to_json(),
        "seeds": seeds,
        "rows": rows,
        "runs": {
            str(t0): [
                {m: {"final": r["final"], "epochs": r["epochs"]} for m, r in res.items()}
                for res in per
            ]
            for t0, per in runs.items()
        },
    }
    md = markdown(rows, cfg, doc["machine"])
    log(md)
    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    base.with_suffix(".md").write_text(md)
    plot(rows, base.with_suffix(".png"), f"{cfg.dataset} {cfg.model}: test error vs wall-clock")
    return doc
