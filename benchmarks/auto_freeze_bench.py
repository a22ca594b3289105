"""Adaptive freezing benchmark: ``--freeze auto`` (AutoFreeze's gradient rule) against
FreezeOut's fixed clock, each computed (``freezeout``) and cached (``prefast``).

Two settings. From scratch: the results' synthetic subset setting (DenseNet-BC depth 16,
a 2000-image subset, 6 epochs). Fine-tuning: the ViT-tiny with 8 px patches pretrained
here as in the fine-tuning benchmark (nothing can be downloaded), fine-tuned whole
(``--freeze-prefix 0``: the rule decides every stage) on scikit-learn digits as a 64 px
PNG image folder for 6 epochs. In each: ``baseline``, FreezeOut at t0 0.5 and 0.7,
``--freeze auto`` at percentiles 50 (AutoFreeze's median) and 25, each schedule in
``freezeout`` and ``prefast`` modes, 3 seeds; every seed's runs of one schedule go side
by side through ``compare``. Quick: a smaller model and image size, t0 0.5 and
percentile 50, one seed.

Recorded per run: wall-clock, test accuracy after every epoch (the plot: accuracy
against cumulative epoch seconds, one panel per setting), the iteration at which each
stage froze, the epochs that read a cache and the cache events (boundaries written, and
``not_cached`` with the reason when a freeze came too late to pay).
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from prefast.benchmarks.plotting import panels, save
from prefast.benchmarks.train_bench import _ms as mean_std
from prefast.config import TrainConfig
from prefast.training.compare import compare
from prefast.training.trainer import train

MODES = ("freezeout", "prefast")


def schedules(quick: bool) -> list[tuple[str, dict]]:
    """(label, config changes): FreezeOut's clock at two t0, the rule at two percentiles."""
    clock = [("t0 0.5", {"t0": 0.5}), ("t0 0.7", {"t0": 0.7})]
    rule = [(f"auto p{p}", {"freeze": "auto", "freeze_percentile": float(p)}) for p in (50, 25)]
    return [clock[0], rule[0]] if quick else [*clock, *rule]


VIT_MODEL_NAME = "timm vit_tiny, 8 px patches, pretrained here (passed as a model object)"


@dataclass
class Setting:
    name: str
    title: str
    cfg: TrainConfig
    model: Callable[[int], torch.nn.Module | None]  # seed -> the model object (None: by name)
    model_name: str | None = None  # what the model object is (cfg.model names it otherwise)


def summarize(run: dict) -> dict:
    final, epochs = run["final"], run["epochs"]
    events = final.get("cache_events", [])
    return {
        "wall_s": final["wall_s"],
        "test_acc": final["test_acc"],
        "freeze_iters": final["freeze_iters"],
        "total_iters": final["batches_per_epoch"] * run["config"]["epochs"],
        "freeze_decisions": [
            {"iter": d["iter"], "frozen": d["frozen"]} for d in final.get("freeze_decisions", [])
        ],
        "cached_epochs": sum(1 for e in epochs if e.get("cached_batches")),
        "curve": [{"epoch_s": e["time_s"], "test_acc": e["test_acc"]} for e in epochs],
        "cache": [
            {k: e.get(k) for k in ("event", "epoch", "stage", "tier", "dtype", "bytes", "reason")}
            for e in events
            if e["event"] in ("boundary", "not_cached")
        ],
    }


def run_setting(setting: Setting, seeds: list[int], quick: bool, cache: Path, log=print) -> dict:  # type: ignore[no-untyped-def]
    """Every schedule in both modes (and baseline once per seed) for every seed."""
    runs: dict[str, list[dict]] = {"baseline": []}
    plan = schedules(quick)
    for seed in seeds:
        for i, (label, changes) in enumerate(plan):
            modes = (["baseline"] if i == 0 else []) + list(MODES)
            log(f"=== {setting.name} seed {seed} {label}: {', '.join(modes)} ===")
            where = cache / setting.name / f"seed{seed}_{label.replace(' ', '_')}"
            cfg = setting.cfg.replace(seed=seed, cache_dir=str(where), **changes)
            for mode, run in compare(cfg, modes, model=setting.model(seed)).items():
                key = "baseline" if mode == "baseline" else f"{label} | {mode}"
                runs.setdefault(key, []).append(summarize(run))
                f = run["final"]
                log(f"  {mode:<10} wall {f['wall_s']:.1f}s acc {f['test_acc']:.4f} "
                    f"freeze_iters {f['freeze_iters']}")  # fmt: skip
            shutil.rmtree(where, ignore_errors=True)
    config = setting.cfg.to_json()
    if setting.model_name:  # cfg.model is unused when a model object is passed
        config["model"] = setting.model_name
    return {"name": setting.name, "title": setting.title, "config": config,
            "seeds": seeds, "schedules": [label for label, _ in plan], "runs": runs}  # fmt: skip


def synthetic_setting(cfg: TrainConfig) -> Setting:
    title = (f"from scratch: densenet-bc depth {cfg.depth} k={cfg.growth_rate}, synthetic "
             f"subset {cfg.subset}, {cfg.epochs} epochs, batch {cfg.batch_size}, augment "
             f"{cfg.augment}")  # fmt: skip
    return Setting("synthetic_subset", title, cfg, lambda seed: None)


def _vit(image_size: int, num_classes: int) -> torch.nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224", img_size=image_size, patch_size=8, num_classes=num_classes
    )


def pretrain_vit(folder: Path, quick: bool, cache: str, log=print) -> dict:  # type: ignore[no-untyped-def]
    """ViT-tiny (8 px patches) trained briefly on the synthetic set (baseline mode), saved
    without its classifier as ``folder``/vit_tiny.pt: this benchmark's backbone, kept as it
    was measured (the fine-tuning benchmark's backbones are pretrain_backbones.py's)."""
    folder.mkdir(parents=True, exist_ok=True)
    size = (512, 128) if quick else (10_000, 1_000)
    epochs = 1 if quick else 2
    cfg = TrainConfig(
        mode="baseline", dataset="synthetic", synthetic_size=size, batch_size=64, lr=0.05,
        device="cpu", cache_dir=cache, augment="standard", epochs=epochs,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _vit(32, 10)
    run = train(cfg, model=model)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    torch.save(state, folder / "vit_tiny.pt")
    log(f"pretrained vit_tiny: {epochs} epochs on {size[0]} synthetic images, "
        f"{run['final']['wall_s']:.0f}s, synthetic test acc {run['final']['test_acc']:.3f}")  # fmt: skip
    return {"vit_tiny": {"images": size[0], "image_size": 32, "epochs": epochs,
                         "wall_s": run["final"]["wall_s"], "test_acc": run["final"]["test_acc"]}}  # fmt: skip


def vit_setting(quick: bool, root: Path, log=print) -> tuple[Setting, dict]:  # type: ignore[no-untyped-def]
    """A ViT-tiny pretrained here on synthetic images, fine-tuned whole on digits."""
    from prefast.benchmarks.imagefolder_bench import write_digits_folder
    from prefast.models.weights import load_weights

    pretrained = pretrain_vit(root / "backbones", quick, str(root / "pretrain_cache"), log)
    size, train_images, epochs = (32, 256, 2) if quick else (64, 1500, 6)
    folder = write_digits_folder(
        root / f"digits_{train_images}_{size}px_png", size, "png", train_images
    )
    cfg = TrainConfig(
        dataset="imagefolder", data_dir=str(folder), image_size=size, epochs=epochs,
        batch_size=64, lr=0.05, t0=0.8, seed=0, freeze_prefix=0, augment="none",
        workers=2, device="cpu", cache_dir=str(root),
    )  # fmt: skip

    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)  # the new head's initial weights, as --seed draws them
        vit = _vit(size, 10)
        load_weights(vit, str(root / "backbones" / "vit_tiny.pt"))
        return vit

    title = (f"fine-tuning: ViT-tiny (8 px patches, pretrained here), every stage trainable, "
             f"digits {size} px PNG folder ({train_images} train / 297 test), "
             f"{epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}, cache dtype "
             f"{cfg.cache_dtype}")  # fmt: skip
    return Setting("vit_finetune", title, cfg, model, VIT_MODEL_NAME), pretrained


def run_auto_freeze_bench(  # type: ignore[no-untyped-def]
    out: Path, cache: str, quick: bool, synthetic_cfg: TrainConfig, log=print
) -> list[Path]:
    """Both settings; write ``out``/auto_freeze.json, .md, .png."""
    from prefast.benchmarks.store_bench import machine

    root = Path(cache) / "auto_freeze"
    shutil.rmtree(root, ignore_errors=True)
    seeds = [0] if quick else [0, 1, 2]
    vit, pretrained = vit_setting(quick, root / "finetune", log)
    doc = {
        "machine": machine(),
        "quick": quick,
        "pretrained": pretrained,
        "settings": [
            run_setting(s, seeds, quick, root / "caches", log)
            for s in (synthetic_setting(synthetic_cfg), vit)
        ],
    }
    md = markdown(doc)
    log(md)
    (out / "auto_freeze.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    (out / "auto_freeze.md").write_text(md)
    plot(doc, out / "auto_freeze.png")
    return [out / f"auto_freeze.{ext}" for ext in ("json", "md", "png")]


def _ms(values: list[float], digits: int = 2) -> str:
    mean, sd = mean_std(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def frozen_share(r: dict) -> float:
    """The share of the run's stage-iterations (head excluded) spent frozen."""
    body, total = r["freeze_iters"][:-1], r["total_iters"]
    return sum(total - min(i, total) for i in body) / (len(body) * total) if body else 0.0


def _cache(r: dict) -> str:
    parts = []
    for e in r["cache"]:
        if e["event"] == "boundary":
            parts.append(f"stage {e['stage']} {e['tier']} (epoch {e['epoch'] + 1})")
        else:
            parts.append(f"not cached at stage {e['stage']}: {e['reason']}")
    return "; ".join(parts) or "-"


def why_other_freezes(computed: dict, cached: dict, config: dict) -> str:
    """Why a prefast run's rule froze stages at other iterations than the computed run's:
    the first stage that differs, and the cache it trained on top of by then. A clock
    (``--t0``) freezes alike by construction; the rule measures gradients, and a stage
    after a boundary is fed the cached rows, not a newly computed, newly augmented batch."""
    first = next(
        i for i, (x, y) in enumerate(zip(computed["freeze_iters"], cached["freeze_iters"],
                                         strict=True)) if x != y
    )  # fmt: skip
    per_epoch = computed["total_iters"] // config["epochs"]
    # The last boundary at or before that stage whose rows were read before it froze.
    since_iter = min(computed["freeze_iters"][first], cached["freeze_iters"][first])
    read = [
        e for e in cached["cache"] if e["event"] == "boundary" and e["stage"] <= first
        and (e["epoch"] + 1) * per_epoch <= since_iter
    ]  # fmt: skip
    if not read:
        return (f"stage {first} first (no cache was read before it: the runs' own "
                "nondeterminism, e.g. threaded reductions, moved the rule's measure)")  # fmt: skip
    b = read[-1]
    since = (b["epoch"] + 1) * per_epoch
    augment = config["augment"]
    if augment == "auto":  # what a run from scratch on a built-in dataset resolves it to
        augment = "none" if config["freeze_prefix"] == "all" else "standard"
    view = (
        f"one fixed augmented view (augment {augment}, {config['cache_views']} cached "
        "view(s)), where the computed run draws a new crop and flip every epoch,"
        if augment != "none"
        else "the same rows"
    )
    return (
        f"first at stage {first}, after the boundary at stage {b['stage']} was read (iteration "
        f"{since} on): stages {b['stage']} and later trained on {view} stored in "
        f"{b['dtype']}, so the gradients the rule compares differ; test acc "
        f"{computed['test_acc']:.4f} computed, {cached['test_acc']:.4f} cached"
    )


def _ratios(a: list[dict], b: list[dict]) -> list[float]:
    return [x["wall_s"] / y["wall_s"] for x, y in zip(a, b, strict=True)]


def setting_markdown(s: dict) -> list[str]:
    runs, base = s["runs"], s["runs"]["baseline"]
    total = base[0]["total_iters"]
    lines = [
        f"### {s['title']}",
        "",
        f"Seeds {s['seeds']}; {total} iterations per run. First freeze: the first iteration "
        "at which a stage froze; frozen share: the share of stage-iterations (head excluded) "
        "spent frozen; vs freezeout: the same schedule computed, per seed.",
        "",
        "| schedule | mode | wall s | vs baseline | vs freezeout | test acc | first freeze "
        "| frozen share | epochs read from cache |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| - | baseline | {_ms([r['wall_s'] for r in base], 1)} | 1.00 | - "
        f"| {_ms([r['test_acc'] for r in base], 4)} | - | 0 | 0 |",
    ]
    for label in s["schedules"]:
        for mode in MODES:
            rs = runs[f"{label} | {mode}"]
            vs_f = (
                _ms(_ratios(runs[f"{label} | freezeout"], rs)) + "×" if mode == "prefast" else "-"
            )
            first = [min(r["freeze_iters"]) for r in rs]
            lines.append(
                f"| {label} | {mode} | {_ms([r['wall_s'] for r in rs], 1)} "
                f"| {_ms(_ratios(base, rs))}× | {vs_f} | {_ms([r['test_acc'] for r in rs], 4)} "
                f"| {_ms(first, 0)} | {_ms([frozen_share(r) for r in rs])} "
                f"| {_ms([r['cached_epochs'] for r in rs], 1)} |"
            )
    lines += ["", "Freeze iteration of each stage (head last), seed by seed, freezeout mode "
              "(prefast froze alike: see the check below):", ""]  # fmt: skip
    lines += ["| schedule | seed | freeze iteration per stage |", "|---|---:|---|"]
    for label in s["schedules"]:
        for seed, r in zip(s["seeds"], runs[f"{label} | freezeout"], strict=True):
            lines.append(f"| {label} | {seed} | {r['freeze_iters']} |")
    differ = [
        (label, seed, a, b)
        for label in s["schedules"]
        for seed, a, b in zip(
            s["seeds"], runs[f"{label} | freezeout"], runs[f"{label} | prefast"], strict=True
        )
        if a["freeze_iters"] != b["freeze_iters"]
    ]
    lines += ["", f"prefast froze at the same iterations as freezeout in every run: {not differ}."]
    if differ:
        lines += ["", "Where it did not, and why:", "",
                  "| schedule | seed | freezeout | prefast | why |", "|---|---:|---|---|---|"]  # fmt: skip
    for label, seed, a, b in differ:
        lines.append(
            f"| {label} | {seed} | {a['freeze_iters']} | {b['freeze_iters']} "
            f"| {why_other_freezes(a, b, s['config'])} |"
        )
    lines.append("")
    lines += ["Cache decisions of the prefast runs, seed by seed:", "",
              "| schedule | seed | boundaries |", "|---|---:|---|"]  # fmt: skip
    for label in s["schedules"]:
        for seed, r in zip(s["seeds"], runs[f"{label} | prefast"], strict=True):
            lines.append(f"| {label} | {seed} | {_cache(r)} |")
    return lines


def markdown(doc: dict) -> str:
    m = doc["machine"]
    pre = "; ".join(
        f"{k} {v['epochs']} epochs on {v['images']} synthetic 32 px images "
        f"(synthetic test acc {v['test_acc']:.3f})"
        for k, v in doc["pretrained"].items()
    )
    head = (
        "Adaptive freezing (`--freeze auto`, AutoFreeze's gradient rule, default interval a "
        "quarter epoch) against FreezeOut's clock (`--t0`), each computed (`freezeout`) and "
        f"cached (`prefast`). Pretrained here: {pre}. {m['cores']} cores "
        f"({m.get('cpu', '?')}), GPU {m['gpu']}, torch {m['torch']}. Mean ± std over seeds; "
        "ratios are per seed, measured side by side in one process.\n\n"
    )
    body: list[str] = []
    for s in doc["settings"]:
        body += [*setting_markdown(s), ""]
    return head + "\n".join(body)


def _curve(rs: list[dict]) -> tuple[list[float], list[float]]:
    """Mean cumulative epoch seconds and mean test accuracy after each epoch."""
    n = len(rs[0]["curve"])
    xs, ys, t = [], [], 0.0
    for i in range(n):
        t += statistics.mean(r["curve"][i]["epoch_s"] for r in rs)
        xs.append(t)
        ys.append(statistics.mean(r["curve"][i]["test_acc"] for r in rs))
    return xs, ys


def plot(doc: dict, path: Path) -> None:
    settings = doc["settings"]
    fig, axes = panels(len(settings), 5.2, 4.0)
    colors = ["tab:blue", "tab:purple", "tab:orange", "tab:red"]
    for ax, s in zip(axes, settings, strict=True):
        xs, ys = _curve(s["runs"]["baseline"])
        ax.plot(xs, ys, color="tab:gray", marker="o", ms=3, label="baseline")
        for color, label in zip(colors, s["schedules"], strict=False):
            for mode, style in (("freezeout", "--"), ("prefast", "-")):
                xs, ys = _curve(s["runs"][f"{label} | {mode}"])
                ax.plot(xs, ys, style, color=color, marker="o", ms=3, label=f"{label} {mode}")
        ax.set_xlabel("cumulative epoch seconds (train + eval), mean over seeds")
        ax.set_ylabel("test accuracy")
        ax.set_title(s["name"].replace("_", " "), fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("accuracy against wall-clock: --freeze auto vs FreezeOut's clock, "
                 "computed (dashed) or cached (solid)", fontsize=9)  # fmt: skip
    save(fig, path)


def main() -> int:
    """Rewrite ``auto_freeze.md`` from its JSON (the runs themselves: ``run_all.py --only
    auto_freeze``, 53 min)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--markdown-from", default="benchmarks/results/auto_freeze.json")
    a = p.parse_args()
    src = Path(a.markdown_from)
    src.with_suffix(".md").write_text(markdown(json.loads(src.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
