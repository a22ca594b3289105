"""The figure scaffolding every benchmark plot shares: a row of panels, saved as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def panels(n: int, width: float, height: float) -> tuple[Any, list[Any]]:
    """A figure with ``n`` panels side by side, each ``width`` x ``height`` inches, on the
    file-only Agg backend (benchmarks run without a display): (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def save(fig: Any, path: Path) -> None:
    """Lay out, write ``path`` at 120 dpi and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
