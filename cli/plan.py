"""`prefast plan`: stages, freeze points, boundaries, tiers and predicted times."""

from __future__ import annotations

import argparse
import math

from .common import add_train_flags, config_from_args, human_bytes, write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="show the freeze schedule, cache boundaries, tiers and predicted times",
        description="Times each stage on one batch, then shows when each stage freezes, which "
        "boundaries PreFast would materialize, the tier the governor picks and why, and the "
        "ideal wall-clock of baseline, freezeout and prefast.",
    )
    add_train_flags(p, modes=False)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--costs-from",
        metavar="RUN.json",
        help="price the plan with the stage costs and bandwidths a prefast run measured (its "
        "--json-out record, or a compare record), not this machine's: plan a GPU run's "
        "numbers on a CPU (the model and data flags must match that run's)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prefast.training.plan import measure_and_plan

    cfg = config_from_args(args, mode="prefast")
    plan = measure_and_plan(cfg, costs_from=args.costs_from)
    plan.pop("costs")
    if args.json:
        write_json("-", plan)
        return 0
    if plan["scaling_warning"]:
        print(f"warning: {plan['scaling_warning']}\n")
    if plan["freeze_rule"]:
        print(f"freeze points are decided during the run ({plan['freeze_rule']})\n")
    print(
        f"{'stage':>5} {'freeze_iter':>11} {'freeze_epoch':>12} {'fwd_ms':>8} {'fwd+bwd_ms':>10}"
        f" {'int8 err':>8} {'fp8 err':>8}  output"
    )
    for s in plan["stages"]:
        err = {d: f"{e:.2%}" for d, e in s["rel_error"].items()}  # error of storing the output
        it, ep = s["freeze_iter"], s["freeze_epoch"]
        it, ep = ("run", "run") if it is None else (it, f"{ep:.2f}")
        fb = "-" if s["fwd_bwd_ms"] is None else f"{s['fwd_bwd_ms']:.2f}"  # a fixed prefix's
        print(
            f"{s['stage']:>5} {it:>11} {ep:>12} {s['fwd_ms']:>8.2f} "
            f"{fb:>10} {err.get('int8', '-'):>8} {err.get('float8', '-'):>8}  "
            f"{'x'.join(map(str, s['out_shape']))}"
        )
    if plan["if_frozen"]:
        print("\nif the rule freezes stages 0..i-1 (the cache after stage i-1):")
        for b in plan["if_frozen"]:
            last = b["last_paying_epoch"]
            when = (
                f"pays if frozen by the start of epoch {last + 1}"
                if last is not None
                else ("never pays in this run")
            )
            print(
                f"  stage {b['stage']:>2}: {human_bytes(b['bytes'])} -> {b['tier']} in "
                f"{b['dtype']}; {when}"
            )
    bw = plan["pricing"]["bandwidths"]
    print(f"\nbandwidths, MB/s write/read ({bw['source']}):")
    print(
        "  "
        + ", ".join(
            f"{k} {bw['write'][k] / 1e6:,.0f}/{bw['read'][k] / 1e6:,.0f}"
            for k in bw["write"]
            if k in bw["read"]
        )
    )
    print("\nboundaries (materialized during epoch, read from the next):")
    if not plan["boundaries"] and plan["freeze_rule"]:
        prefix = cfg.freeze_prefix
        why = (
            f"the --freeze-prefix {prefix} stage(s) do not pay for a cache"
            if prefix
            else "no --freeze-prefix"
        )
        print(f"  planned when the rule freezes (none before: {why})")
    elif not plan["boundaries"]:
        print("  none: no frozen prefix pays for its cache in this run")
    for b in plan["boundaries"]:
        if b.get("reused"):  # an earlier run's cache: read from this epoch, not written
            print(f"  epoch {b['epoch'] + 1}: stages 0..{b['stage'] - 1}  {human_bytes(b['bytes'])}"
                  f"  reused from {b['tier']} in {b['dtype']}, read from epoch {b['epoch'] + 1} "
                  f"({b['reason']})")  # fmt: skip
            continue
        print(
            f"  epoch {b['epoch'] + 1}: stages 0..{b['stage'] - 1}  {human_bytes(b['bytes'])}  -> "
            f"{b['tier']} in {b['dtype']}: saves {b['saving_s']:.3g}s, costs "
            f"{b['cost_s']:.3g}s ({b['reason']})"
        )
    skipped = [c for c in plan["pricing"]["candidates"] if not c["taken"]]
    if skipped:
        print("\nnot planned (priced in the tier each would land in):")
    for c in skipped:
        cost = "-" if c["cost_s"] is None else f"{c['cost_s']:.3g}s"
        print(
            f"  epoch {c['epoch'] + 1}: stages 0..{c['stage'] - 1}  {c['tier']}: saves "
            f"{c['saving_s']:.3g}s, costs {cost}: {c['why']}"
        )
    print("\npredicted wall-clock (ideal cost model, no I/O):")
    pred = plan["predicted_s"]
    for mode, secs in pred.items():
        if math.isnan(secs):
            print(f"  {mode:<10} {'-':>8}   (the costs' record timed forwards only)")
            continue
        ratio = pred["baseline"] / secs
        vs = f"{ratio:.2f}x vs baseline" if not math.isnan(ratio) else "no baseline to compare"
        print(f"  {mode:<10} {secs:8.1f}s  ({vs})")
    if plan["freeze_rule"]:
        print("  freezeout, prefast: depend on when the rule freezes (the run record says)")
    return 0
