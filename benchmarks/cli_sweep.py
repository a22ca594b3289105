"""A sweep as a user runs it: separate ``prefast train`` processes, one per head learning
rate, over the ResNet-50 128 px linear probe of the finetune benchmark, with the CLI's
defaults (no ``--mode``, ``--cache-tier`` or ``--augment``), against the same runs
computing the prefix (``--mode freezeout``): one measured, counted once per learning rate.

    python benchmarks/cli_sweep.py                        # 4 rates, 10 epochs (~12 min on 2 cores)
    python benchmarks/cli_sweep.py --epochs 2 --lrs 0.1,0.05 --out /tmp/x   # smaller

The backbone is ``--weights FILE`` (e.g. the finetune benchmark's pretrained
``resnet50.pt``), else an untrained torchvision ResNet-50 (seed 0) saved without its
classifier: the timing does not depend on the weights, and this file claims no accuracy.
Each process's outer seconds include starting Python, building the model, loading the
weights and the data: what a user waits for. Writes ``cli_sweep.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from prefast.benchmarks.imagefolder_bench import write_digits_folder


def backbone(path: str | None, workdir: Path) -> tuple[str, str]:
    """The weights file and what it is."""
    if path:
        return path, f"--weights {path}"
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.resnet50(num_classes=10).state_dict()
    out = workdir / "resnet50_untrained.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, out)
    return str(out), "untrained torchvision ResNet-50, seed 0 (timing only)"


def run(args: list[str], out: Path) -> dict:
    """One ``prefast train`` process: its outer seconds, record fields and console lines."""
    cmd = [sys.executable, "-m", "prefast.cli.main", "train", *args, "--json-out", str(out)]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    outer = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    rec = json.loads(out.read_text())
    final, first = rec["final"], rec["epochs"][0]
    said = [line for line in res.stdout.splitlines() if "cache" in line and "epoch" not in line[:6]]
    return {
        "outer_s": round(outer, 2),
        "wall_s": round(final["wall_s"], 2),
        "feed_setup_s": round(final.get("feed_setup_s", 0.0), 3),
        "first_epoch_cached": first["cached_batches"],
        "batches_per_epoch": final["batches_per_epoch"],
        "test_acc": final["test_acc"],
        "said": said,
    }


def sweep(common: list[str], lrs: list[str], work: Path, log=print) -> dict:  # type: ignore[no-untyped-def]
    """``prefast train`` processes with ``common`` flags, one per learning rate, sharing one
    cache dir under ``work``, and one ``--mode freezeout`` process (counted once per rate)."""
    cache = work / "cache"
    runs = []
    for i, lr in enumerate(lrs):
        r = run([*common, "--lr", lr, "--cache-dir", str(cache)], work / f"prefast_{i}.json")
        runs.append({"lr": lr, **r})
        log(f"prefast   lr {lr}: {r['outer_s']:.1f}s (setup {r['feed_setup_s']:.2f}s, epoch 1 "
            f"from cache {r['first_epoch_cached']}/{r['batches_per_epoch']})")  # fmt: skip
        for line in r["said"]:
            log(f"    {line}")
    computed = run([*common, "--mode", "freezeout", "--lr", lrs[0], "--cache-dir",
                    str(work / "unused")], work / "freezeout.json")  # fmt: skip
    log(f"freezeout lr {lrs[0]}: {computed['outer_s']:.1f}s")
    total = sum(r["outer_s"] for r in runs)
    return {
        "command": "prefast train " + " ".join(common) + " --lr LR",
        "lrs": lrs,
        "prefast_runs": runs,
        "freezeout_run": computed,
        "prefast_total_s": round(total, 1),
        "computed_total_s": round(computed["outer_s"] * len(lrs), 1),
        "computed_total_is": f"one freezeout process measured, x{len(lrs)}",
        "speedup": round(computed["outer_s"] * len(lrs) / total, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lrs", default="0.2,0.1,0.05,0.02")
    p.add_argument("--weights", help="backbone state dict (default: an untrained ResNet-50)")
    p.add_argument("--workdir", help="data, weights and caches (default: a temporary dir)")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="cli_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    folder = write_digits_folder(work / "digits_1500_128px_png", 128, "png", 1500)
    weights, what = backbone(a.weights, work)
    common = [
        "--model", "torchvision:resnet50", "--weights", weights, "--freeze-prefix", "all",
        "--t0", "1", "--dataset", "imagefolder", "--data-dir", str(folder),
        "--image-size", "128", "--epochs", str(a.epochs), "--batch-size", "64",
        "--workers", "2", "--device", "cpu", "--seed", "0",
    ]  # fmt: skip
    doc = {
        "backbone": what,
        "setting": "ResNet-50 at 128 px, linear probe (--freeze-prefix all --t0 1), "
        f"{a.epochs} epochs, digits as PNG folders (1,500 train / 297 test), batch 64, "
        "2 DataLoader workers, CPU",
        "epochs": a.epochs,
        **sweep(
            common, [s.strip() for s in a.lrs.split(",")], work, log=lambda m: print(m, flush=True)
        ),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli_sweep.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "cli_sweep.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


def markdown(doc: dict) -> str:
    n = len(doc["lrs"])
    lines = [
        "# A sweep as separate `prefast train` processes",
        "",
        f"{doc['setting']}. Backbone: {doc['backbone']}. Regenerate: "
        "`python benchmarks/cli_sweep.py`.",
        "",
        f"Each process as a user types it, no cache flags: `{doc['command']}`.",
        "",
        "| run | lr | seconds (process) | feed setup s | epoch 1 batches from the cache | test acc |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(doc["prefast_runs"]):
        lines.append(
            f"| prefast {i + 1} | {r['lr']} | {r['outer_s']:.1f} | {r['feed_setup_s']:.2f} | "
            f"{r['first_epoch_cached']}/{r['batches_per_epoch']} | {r['test_acc']:.4f} |"
        )
    c = doc["freezeout_run"]
    lines += [
        f"| freezeout (prefix computed) | {doc['lrs'][0]} | {c['outer_s']:.1f} | - | "
        f"0/{c['batches_per_epoch']} | {c['test_acc']:.4f} |",
        "",
        f"**{n} rates: {doc['prefast_total_s']:.1f} s as prefast processes against "
        f"{doc['computed_total_s']:.1f} s computing the prefix ({doc['computed_total_is']}): "
        f"{doc['speedup']:.2f}×.**",
        "",
        "What the processes printed about their caches:",
        "",
        "```",
        *[line for r in doc["prefast_runs"] for line in r["said"]],
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
