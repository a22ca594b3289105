"""Progress bars (rich), shown only when asked and stderr is a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


def _noop(n: int = 1) -> None:
    pass


@contextlib.contextmanager
def bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n=1)``; draws a transient bar on stderr when enabled."""
    if not (enabled and sys.stderr.isatty()):
        yield _noop
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            progress.advance(task, n)

        yield advance


def epoch_bar(epoch: int, epochs: int, batches: int, enabled: bool = True):
    return bar(f"epoch {epoch + 1}/{epochs}", batches, enabled)
