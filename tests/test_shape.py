"""The shape of the code: no import cycles, layers that import only downwards, the store
stands alone, small modules."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The design card's top level: store/ and cli/ stand beside prefast/ and are mapped into
# its namespace by setup.cfg's package_dir (imported as prefast.store and prefast.cli).
PACKAGES = {
    "prefast": ROOT / "prefast",
    "prefast.store": ROOT / "store",
    "prefast.cli": ROOT / "cli",
}

# The layers of prefast/, lowest first (the package docstrings say what each owns). A
# module may import its own package and any lower layer, never a higher one nor another
# package of its own layer: the tree then reads as the data flow.
LAYERS = [
    ["prefast.store"],
    ["prefast.errors"],
    ["prefast.models", "prefast.data", "prefast.freezing", "prefast.distributed"],
    ["prefast.config"],
    ["prefast.caching"],
    ["prefast.training"],
    ["prefast.cli"],
    ["prefast"],  # the public API re-exports from every layer
]


def modules() -> dict[str, Path]:
    found = {}
    for pkg, path in PACKAGES.items():
        for f in path.rglob("*.py"):
            rel = f.relative_to(path).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([pkg, *parts])] = f
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ours that ``name`` imports anywhere in its body (lazy imports count)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def test_no_import_cycle_among_our_modules():
    mods = modules()
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def layer_of(module: str) -> tuple[int, str]:
    """(rank, package) of ``module``: the most specific LAYERS entry it lies in."""
    units = [
        unit
        for layer in LAYERS
        for unit in layer
        if module == unit or (unit != "prefast" and module.startswith(unit + "."))
    ]
    assert units, f"{module} is in no layer: add it to LAYERS in tests/test_shape.py"
    best = max(units, key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer), best


def test_every_module_belongs_to_a_layer_and_imports_only_downwards():
    mods = modules()
    wrong = []
    for name, path in sorted(mods.items()):
        rank, unit = layer_of(name)
        for dep in sorted(imports_of(name, path, set(mods))):
            dep_rank, dep_unit = layer_of(dep)
            if dep_unit != unit and dep_rank >= rank:
                wrong.append(f"{name} (layer {rank}) imports {dep} (layer {dep_rank})")
    assert not wrong, "\n".join(wrong)


def test_the_store_imports_nothing_from_the_trainer_side():
    for name, path in modules().items():
        if not name.startswith("prefast.store"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not (
                    node.module.startswith("prefast")
                    and not node.module.startswith("prefast.store")
                ), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for a in node.names:
                    assert not a.name.startswith("prefast"), f"{path.name} imports {a.name}"


def test_no_module_over_400_lines_and_a_short_trainer():
    sizes = {p: len(p.read_text().splitlines()) for p in modules().values()}
    big = {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > 400}
    assert not big, big
    assert sizes[ROOT / "prefast" / "training" / "trainer.py"] <= 350


def test_the_top_level_is_the_design_cards_and_setup_cfg_maps_store_and_cli():
    """DESIGN.md's layout: store/ and cli/ beside prefast/, imported as prefast.store/.cli."""
    for name in ("prefast", "store", "cli", "tests", "benchmarks"):
        assert (ROOT / name).is_dir(), f"{name}/ is missing from the top level"
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        assert (ROOT / name).is_file(), f"{name} is missing from the top level"
    assert not (ROOT / "prefast" / "store").exists()
    assert not (ROOT / "prefast" / "cli").exists()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    mapping = dict(
        (k.strip(), v.strip())
        for k, v in (line.split("=") for line in cfg["options"]["package_dir"].split("\n") if line)
    )
    assert mapping["prefast.store"] == "store" and mapping["prefast.cli"] == "cli"
    packages = cfg["options"]["packages"].split()
    assert "prefast.store" in packages and "prefast.cli" in packages
