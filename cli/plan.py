"""`prefast plan`: stages, freeze points, boundaries, tiers and predicted times."""

from __future__ import annotations

import argparse

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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prefast.training.plan import measure_and_plan

    cfg = config_from_args(args, mode="prefast")
    plan = measure_and_plan(cfg)
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
        print(
            f"{s['stage']:>5} {it:>11} {ep:>12} {s['fwd_ms']:>8.2f} "
            f"{s['fwd_bwd_ms']:>10.2f} {err.get('int8', '-'):>8} {err.get('float8', '-'):>8}  "
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
        print(
            f"  epoch {b['epoch'] + 1}: stages 0..{b['stage'] - 1}  {human_bytes(b['bytes'])}  -> "
            f"{b['tier']} in {b['dtype']} ({b['reason']})"
        )
    print("\npredicted wall-clock (ideal cost model, no I/O):")
    pred = plan["predicted_s"]
    for mode, secs in pred.items():
        print(f"  {mode:<10} {secs:8.1f}s  ({pred['baseline'] / secs:.2f}x vs baseline)")
    if plan["freeze_rule"]:
        print("  freezeout, prefast: depend on when the rule freezes (the run record says)")
    return 0
