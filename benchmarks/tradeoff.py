"""Print how FreezeOut's t0 trades speed for accuracy, from a training benchmark's table.

``make demo`` runs it under its own table so that a first run's gap to baseline is read
as what it is: the schedule's choice (t0), measured on the same kind of data and model,
not a cost of the cache. Usage: ``python benchmarks/tradeoff.py benchmarks/results/train_subset.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def rows(table: str) -> dict[tuple[str, str], list[str]]:
    """{(t0, mode): cells} from the first markdown table of a train benchmark's report."""
    out: dict[tuple[str, str], list[str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[1] in ("baseline", "freezeout", "prefast"):
            out.setdefault((cells[0], cells[1]), cells)
    return out


def main(path: str) -> int:
    text = Path(path).read_text()
    found = rows(text)
    base = found.get(("-", "baseline"))
    t0s = sorted({t0 for t0, mode in found if mode == "prefast"})
    if base is None or not t0s:
        print(f"{path}: no baseline and prefast rows to compare", file=sys.stderr)
        return 1
    setting = text.splitlines()[0].split(";")[0].removeprefix("Training benchmark: ")
    print(f"t0 measured in {path} ({setting}; baseline test acc {base[5]}):")
    for t0 in t0s:
        p = found[(t0, "prefast")]
        print(f"  --t0 {t0}: prefast {p[3]} vs baseline, test acc {p[5]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/train_subset.md"))
