"""Progress: bars (rich) when asked and stderr is a terminal, else plain epoch lines."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


def bar_shown() -> bool:
    """Bars are drawn on a terminal only (a pipe or a log file gets epoch lines)."""
    return sys.stderr.isatty()


def epoch_lines(epochs: int, then: Callable[[dict], None] | None = None) -> Callable[[dict], None]:
    """An ``on_epoch`` that prints one plain line per epoch on stderr, then calls ``then``."""

    def report(r: dict) -> None:
        print(
            f"epoch {r['epoch'] + 1}/{epochs}: loss {r['train_loss']:.4f}, test acc "
            f"{r['test_acc']:.4f}, {r['time_s']:.1f}s, frozen {r['frozen_stages']}/{r['num_stages']} stages",
            file=sys.stderr,
            flush=True,
        )
        if then is not None:
            then(r)

    return report


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
