"""The docs stay honest where that is cheap: every --flag they name exists in the CLI's
--help, every file they link exists, the README stays a front door."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from prefast.cli.main import build_parser
from prefast.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Flags the docs name that belong to other programs (or to Python, not the CLI).
NOT_OURS = {
    "--nproc_per_node",  # torchrun
    "--nnodes",
    "--node_rank",
    "--rdzv_backend",
    "--rdzv_endpoint",
    "--node-rank",  # torchrun accepts dashes too
    "--rdzv-backend",
    "--rdzv-endpoint",
    "--rdzv_id",
    "--standalone",
    "--master_addr",
    "--master_port",
    "--durations",  # pytest
    "--slow-fsync",  # a pytest option of tests/conftest.py
    "--only",  # benchmarks/run_all.py
    "--quick",
    "--out",
}


def our_flags() -> set[str]:
    found: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            found.update(s for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child)

    walk(build_parser())
    return found


def test_every_flag_the_docs_name_is_in_the_help():
    known = our_flags() | NOT_OURS
    unknown = []
    for doc in DOCS:
        for flag in sorted(
            set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", doc.read_text()))
        ):
            if flag not in known:
                unknown.append(f"{doc.relative_to(ROOT)}: {flag}")
    assert not unknown, "flags the CLI does not have:\n" + "\n".join(unknown)


def test_every_file_the_docs_link_exists():
    missing = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)


def test_the_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    assert readme.splitlines()[3:5] == [
        "make demo   # fresh machine: creates .venv, installs, trains briefly on synthetic "
        "data, prints the speedup table",
        "make test   # installs if needed, lints, runs the fast tests (under 4½ minutes on 2 cores)",
    ]
    for doc in DOCS[1:]:  # every page is on the README's map
        assert f"(docs/{doc.name})" in readme, f"{doc.name} is not on the README's map"


def test_the_freezing_page_states_the_rule_s_defaults_as_the_code_has_them():
    """docs/freezing.md says a quarter epoch and AutoFreeze's median: so must the code."""
    from prefast.freezing.adaptive import DECISIONS_PER_EPOCH, default_interval

    page = (ROOT / "docs" / "freezing.md").read_text()
    defaults = {
        a.dest: a.default
        for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions  # type: ignore[union-attr]
    }
    assert "a quarter of an epoch" in page and DECISIONS_PER_EPOCH == 4
    assert default_interval(24) == 6 and default_interval(2) == 1  # "at least 1"
    assert "| `--freeze-percentile P` | 50 (AutoFreeze's median)" in page
    assert TrainConfig().freeze_percentile == 50.0 and defaults["freeze"] == "freezeout"
    assert "| `freezeout` (default) |" in page
