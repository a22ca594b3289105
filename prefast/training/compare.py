"""Run several modes on the same data and seed, and tabulate the speedups."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn
from torch.utils.data import Dataset

from prefast.config import TrainConfig
from prefast.training.build import load_for
from prefast.training.plan import measure_and_plan
from prefast.training.trainer import train


def compare(
    cfg: TrainConfig,
    modes: list[str],
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    *,
    model: nn.Module | None = None,
    train_data: Dataset | None = None,
    test_data: Dataset | None = None,
    data_id: str | None = None,
) -> dict[str, dict]:
    """Train ``cfg`` once per mode, one after another in this process.

    Takes what ``train`` takes; every mode starts from the same initial weights
    (a given ``model`` is copied per mode). Returns ``{mode: run record}``; each
    record gains ``final.predicted_s`` (the ideal cost model's prediction) so
    measured/ideal can be read off. Named datasets are loaded once for the probe
    and every run. The prefast run replays the plan made here, once (its
    boundaries, tiers and dtypes; ``cfg.plan_from`` if given instead), so it caches
    what the table's prediction assumed; it still times its own stages.
    """
    runs: dict[str, dict] = {}
    if train_data is None and test_data is None:
        train_data, test_data = load_for(cfg)
    plan = measure_and_plan(cfg.replace(mode="prefast"), model, train_data, test_data)
    replayable = not cfg.plan_from and cfg.freeze != "auto"
    for mode in modes:
        if log:
            log(f"--- {mode} ---")

        def on_epoch(r: dict, m: str = mode) -> None:
            if log:
                log(
                    f"[{m}] epoch {r['epoch'] + 1}: loss {r['train_loss']:.4f} "
                    f"acc {r['test_acc']:.4f} {r['time_s']:.2f}s"
                )

        result = train(
            cfg.for_mode(mode),
            progress=progress,
            on_epoch=on_epoch,
            model=copy.deepcopy(model) if model is not None else None,
            train_data=train_data,
            test_data=test_data,
            data_id=data_id,
            # --freeze auto plans its boundaries as the rule freezes: nothing to replay
            plan=plan["boundaries"] if mode == "prefast" and replayable else None,
        )
        if mode == "prefast" and replayable:  # the candidates were priced by the plan above
            result["final"]["pricing"] = plan["pricing"]
        if mode in plan["predicted_s"]:  # --freeze auto: baseline's alone is known beforehand
            result["final"]["predicted_s"] = plan["predicted_s"][mode]
            for record, ideal in zip(result["epochs"], plan["predicted_epochs"][mode], strict=True):
                record["predicted_train_s"] = ideal["train_s"]
                record["predicted_eval_s"] = ideal["eval_s"]
        runs[mode] = result
    return runs


def format_table(runs: dict[str, dict]) -> str:
    """Mode, wall-clock, speedups vs baseline and freezeout, accuracy, measured/predicted."""
    walls = {m: r["final"]["wall_s"] for m, r in runs.items()}
    header = f"{'mode':<10} {'wall_s':>8} {'vs_baseline':>11} {'vs_freezeout':>12} {'test_acc':>8} {'meas/pred':>9}"
    lines = [header, "-" * len(header)]
    for mode, r in runs.items():
        f = r["final"]
        vs_b = f"{walls['baseline'] / walls[mode]:.2f}x" if "baseline" in walls else "-"
        vs_f = f"{walls['freezeout'] / walls[mode]:.2f}x" if "freezeout" in walls else "-"
        ratio = f"{f['wall_s'] / f['predicted_s']:.2f}" if f.get("predicted_s") else "-"
        lines.append(
            f"{mode:<10} {f['wall_s']:>8.1f} {vs_b:>11} {vs_f:>12} {f['test_acc']:>8.4f} {ratio:>9}"
        )
    return "\n".join(lines)


def accuracy_notes(runs: dict[str, dict]) -> list[str]:
    """Lines for under the table: what its columns mean and where the accuracy gaps come
    from, from the runs' own numbers (a newcomer otherwise reads the gap to baseline as
    the cache's cost)."""
    lines = ["meas/pred: measured wall-clock over the cost model's prediction for the mode."]
    acc = {m: r["final"]["test_acc"] for m, r in runs.items()}
    if acc.get("prefast") is not None and acc.get("freezeout") is not None:
        run = runs["prefast"]
        cached = sum(1 for e in run["epochs"] if e.get("cached_batches"))
        lines.append(
            f"prefast - freezeout test accuracy: {acc['prefast'] - acc['freezeout']:+.4f}, what "
            f"the {run['final'].get('cache_dtype', '?')} cache changed ({cached} of "
            f"{len(run['epochs'])} epochs read it)."
        )
    if acc.get("freezeout") is not None and acc.get("baseline") is not None:
        run = runs["freezeout"]
        cfg, final = run["config"], run["final"]
        gap = f"freezeout - baseline: {acc['freezeout'] - acc['baseline']:+.4f}"
        when = _first_freeze(final["freeze_iters"], final["batches_per_epoch"] * cfg["epochs"])
        if cfg.get("freeze") == "auto":
            lines.append(
                f"{gap}, the freezing rule's, not the cache's: {when} under --freeze auto; "
                "a lower --freeze-percentile freezes later."
            )
            return lines
        lines += [
            f"{gap}, FreezeOut's schedule, not the cache: at --t0 {cfg['t0']} "
            f"({cfg['scale']} scaling) {when}.",
            "A larger --t0 freezes later: more accuracy, less time saved (FreezeOut's default "
            "is 0.8); docs/results.md has the trade-off, measured over seeds.",
        ]
    return lines


def _first_freeze(freeze_iters: list[int], total: int) -> str:
    """When the first stage freezes, said right with a fixed prefix (frozen from iteration
    0, not by the schedule) and when nothing freezes before the end."""
    prefix = freeze_iters.count(0)  # --freeze-prefix: frozen from the start
    later = [it for it in freeze_iters[prefix:] if it < total]
    held = ""
    if prefix:
        held = f"stages 0-{prefix - 1} are frozen from iteration 0 (--freeze-prefix {prefix}) and "
    if not later:
        return f"{held}no{' other' * bool(prefix)} stage freezes before the end (iteration {total})"
    first = later[0]
    after = " after them" * bool(prefix)
    return f"{held}the first stage{after} freezes at iteration {first} of {total} ({first / total:.0%})"
