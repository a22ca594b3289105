"""timm scan: every timm family either splits with equal logits or exits 2 in one line.

What it measures: for each family (a module of timm's registry, ``timm.list_models(
module=M)``), the smallest model by parameter count (counted on the meta device; names
that say large, huge, giant... are not counted, and a family whose smallest model has
over 30M parameters is skipped, named), built the way ``--model timm:NAME`` builds it
(``prefast.models.library_model``: 3 channels and 10 classes, a CIFAR-shaped dataset; the
first of 32 px, 64 px and the model's default size it takes), which checks its split
against its own forward on 2 random images. The outcome is ``split, equal logits (N
stages)`` with the largest absolute difference of the logits measured again here against
a second build with the same seed, or the one-line refusal (ConfigError) as printed, or
skipped with the reason (too big, over 30 s). Any other exception is a bug and is
recorded as ``error``: the figure that proves the claim is ``error: 0``.

    python benchmarks/timm_scan.py            # every family: results/timm_scan.{json,md}
    python benchmarks/timm_scan.py --quick    # 24 families' known smallest, printed only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch

BIG = re.compile(r"large|huge|giant|gigantic|enormous|colossal|_[1-9]\d*b(_|$)|_448|_512")
MAX_PARAMS = 30_000_000
SECONDS = 30
CHANNELS, CLASSES = 3, 10
# --quick and the slow test (tests/test_model_edges.py): families issue 44 named, and some
# that split, each with its smallest model as the full scan found it (not counted again)
SAMPLE = {
    "cait": "cait_xxs24_224", "fastvit": "fastvit_t8", "levit": "levit_128s",
    "hrnet": "hrnet_w18_small", "hieradet_sam2": "sam2_hiera_tiny", "coat": "coat_tiny",
    "crossvit": "crossvit_tiny_240", "xcit": "xcit_nano_12_p8_224",
    "deit": "deit_tiny_patch16_224", "vision_transformer": "test_vit",
    "swin_transformer": "swin_tiny_patch4_window7_224", "davit": "davit_tiny",
    "convnext": "test_convnext", "efficientnet": "test_efficientnet", "resnet": "test_resnet",
    "senet": "legacy_seresnet18", "densenet": "densenet121", "dpn": "dpn48b",
    "regnet": "regnetx_002", "mobilevit": "mobilevit_xxs", "edgenext": "edgenext_xx_small",
    "efficientvit_msra": "efficientvit_m0", "maxxvit": "test_coatnet",
    "csatv2": "csatv2",  # refuses 32 px, splits at 64
}  # fmt: skip
OUT = Path(__file__).resolve().parent / "results"


class TookTooLong(BaseException):  # not caught by the `except Exception` it interrupts
    pass


@contextlib.contextmanager
def deadline(seconds: int):  # type: ignore[no-untyped-def]
    """Raise TookTooLong in this (main) thread after ``seconds``."""

    def ring(signum: int, frame: object) -> None:
        raise TookTooLong

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def parameters(name: str) -> int | None:
    """``name``'s parameter count, built on the meta device (no memory, no init)."""
    import timm

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
    except Exception:  # a model that cannot be built at its defaults: not counted
        return None
    return sum(p.numel() for p in model.parameters())


def smallest(family: str) -> tuple[str | None, int | None, str]:
    """The family's smallest model by parameters, its count and, when none fits, why."""
    import timm

    names = [n for n in timm.list_models(module=family) if not BIG.search(n)]
    if not names:
        return None, None, "every model's name says it is large"
    counted = [(p, n) for n in names if (p := parameters(n)) is not None]
    if not counted:
        return None, None, "no model builds at its defaults on the meta device"
    count, name = min(counted)
    if count > MAX_PARAMS:
        return name, count, f"its smallest model has {count / 1e6:.1f}M parameters (> 30M)"
    return name, count, ""


def sizes(name: str) -> list[int]:
    import timm

    cfg = timm.models.get_pretrained_cfg(timm.models.get_arch_name(name))
    default = int(cfg.input_size[-1]) if cfg is not None else 224
    return list(dict.fromkeys([32, 64, default]))


def unsplit(name: str, image_size: int) -> Any:
    """The model as ``timm_model`` builds it (same arguments, same seed), not split."""
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": CLASSES, "in_chans": CHANNELS}
    torch.manual_seed(0)
    try:
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        torch.manual_seed(0)
        return timm.create_model(name, **kwargs)


def try_model(name: str) -> dict[str, Any]:
    """Build ``name`` as ``--model timm:NAME`` does at the first size it takes."""
    from prefast.errors import ConfigError
    from prefast.models.library import library_model

    refusal: dict[str, Any] = {}
    for size in sizes(name):
        try:
            torch.manual_seed(0)
            staged = library_model(
                f"timm:{name}", in_channels=CHANNELS, num_classes=CLASSES, image_size=size
            )
        except ConfigError as err:
            refusal = {"kind": "refused", "image_size": size, "outcome": str(err)}
            if "px images" in str(err):  # too small for this size: try the next
                continue
            return refusal
        x = torch.randn(2, CHANNELS, size, size, generator=torch.Generator().manual_seed(1))
        model = unsplit(name, size).eval()
        with torch.no_grad():
            diff = float((staged.eval()(x) - model(x)).abs().max())
        kind = "split" if diff <= 1e-4 else "error"
        what = "equal logits" if kind == "split" else f"logits differ by {diff:.3g}"
        return {
            "kind": kind, "image_size": size, "max_abs_diff": diff,
            "outcome": f"split, {what} ({staged.num_stages} stages)",
        }  # fmt: skip
    return refusal


def scan_family(family: str, model: str | None = None) -> dict[str, Any]:
    """One row: the family's smallest model (or ``model``, not counted against the others)
    built and checked, or skipped with the reason."""
    start = time.perf_counter()
    row: dict[str, Any] = {"family": family}
    try:
        with deadline(SECONDS * 3):  # counting a large family takes a while
            if model is None:
                name, count, why = smallest(family)
            else:
                name, count, why = model, parameters(model), ""
    except TookTooLong:
        name, count, why = None, None, f"counting its models took over {SECONDS * 3} s"
    row.update(model=name, params=count)
    if why or name is None:
        row.update(kind="skipped", outcome=f"skipped: {why}")
    else:
        built = time.perf_counter()
        try:
            with deadline(SECONDS), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row.update(try_model(name))
        except TookTooLong:
            row.update(kind="skipped", outcome=f"skipped: took over {SECONDS} s")
        except Exception as err:  # a bug: recorded, and the scan goes on
            first = (str(err).splitlines() or [""])[0][:200]
            row.update(kind="error", outcome=f"error: {type(err).__name__}: {first}")
        row["build_s"] = round(time.perf_counter() - built, 2)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def machine() -> dict[str, Any]:
    import os

    import timm

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, int]:
    kinds = [r["kind"] for r in rows]
    return {
        "families": len(rows),
        **{k: kinds.count(k) for k in ("split", "refused", "skipped", "error")},
    }


def markdown(record: dict[str, Any]) -> str:
    m, s = record["machine"], record["summary"]
    lines = [
        "# timm scan: split with equal logits, or one line",
        "",
        f"`python benchmarks/timm_scan.py` on {m['cores']} CPU cores, torch {m['torch']}, "
        f"timm {m['timm']}, {record['seconds']:.0f} s. Each timm family (a module of its "
        "registry) is represented by its smallest model by parameter count (counted on the "
        "meta device; names saying large/huge/giant not counted; over 30M skipped), built as "
        "`--model timm:NAME` builds it (3 channels, 10 classes, the first of 32 px, 64 px "
        "and its default size it takes), split, and run on 2 random images against a second "
        "build with the same seed.",
        "",
        f"**{s['families']} families: {s['split']} split with equal logits, {s['refused']} "
        f"refused in one line (exit 2), {s['skipped']} skipped, {s['error']} errors.**",
        "",
        "Skipped: "
        + ", ".join(
            f"{sum(why in r['outcome'] for r in record['families'])} {words}"
            for why, words in (
                ("> 30M", "over 30M parameters"),
                ("name says", "by name"),
                ("took over", f"over {SECONDS} s"),
            )
        )  # fmt: skip
        + ".",
        "",
        "Seconds: `build` is the model built, split, checked and compared (all sizes tried); "
        "`all` adds counting the family's parameters on the meta device. Skipped for time: "
        f"over {SECONDS} s to build.",
        "",
        "| family | model | params (M) | px | outcome | build s | all s |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for r in record["families"]:
        params = f"{r['params'] / 1e6:.2f}" if r.get("params") else "-"
        outcome = r["outcome"].replace("|", "\\|")
        build = f"{r['build_s']:.1f}" if "build_s" in r else "-"
        lines.append(
            f"| {r['family']} | {r.get('model') or '-'} | {params} | {r.get('image_size', '-')} "
            f"| {outcome} | {build} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def rewrite_markdown(out: Path = OUT) -> None:
    """timm_scan.md again from timm_scan.json (the table's wording, not the figures)."""
    record = json.loads((out / "timm_scan.json").read_text())
    (out / "timm_scan.md").write_text(markdown(record))


def main(argv: list[str] | None = None) -> int:
    import logging

    import timm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the sample of families only")
    parser.add_argument("--families", help="comma-separated families (default: all)")
    parser.add_argument("--out", type=Path, default=OUT, help="where the full run writes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the patch warning is expected for some
    torch.set_num_threads(max(1, torch.get_num_threads()))
    families = (
        args.families.split(",") if args.families
        else list(SAMPLE) if args.quick else sorted(timm.list_modules())
    )  # fmt: skip
    start = time.perf_counter()
    rows = []
    for family in families:
        row = scan_family(family, SAMPLE.get(family) if args.quick else None)
        rows.append(row)
        print(f"{family:28s} {row.get('model') or '-':36s} {row['seconds']:6.1f}s  "
              f"{row['outcome'][:150]}", flush=True)  # fmt: skip
    record: dict[str, Any] = {
        "machine": machine(),
        "mode": "quick" if args.quick else "full",
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summary(rows),
        "families": rows,
    }
    print(json.dumps(record["summary"]))
    if not args.quick and not args.families:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "timm_scan.json").write_text(json.dumps(record, indent=1) + "\n")
        (args.out / "timm_scan.md").write_text(markdown(record))
    return 1 if record["summary"]["error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
