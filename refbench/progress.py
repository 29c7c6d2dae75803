"""rich progress displays for long-running commands (training, prepare, evaluation).

`TrainProgress` shows step, epoch, loss, lr, samples/s and ETA; `note()` prints a line above
the bar (validation results). Disabled instances (non-zero ranks, quiet runs) do nothing.
`erased_on_error(progress)` shows any rich Progress for a block. When the block raises, a
display is erased (terminal) or never printed (log file), so the user's `error: ...` line
stands alone; TrainProgress does the same.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class TrainProgress:
    """A rich progress bar over optimiser steps."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True, title: str = "train") -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                       "{task.fields[sps]:.1f} samples/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task(title, total=total_steps, completed=start_step, epoch=0,
                                           loss=float("nan"), lr=0.0, sps=0.0)

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            self.progress.live.transient = True  # as erased_on_error: the error line stands alone
        self.progress.__exit__(exc_type, *rest)

    def update(self, step: int, epoch: int, loss: float, lr: float, samples_per_s: float) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=step, epoch=epoch, loss=loss, lr=lr, sps=samples_per_s)

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text)


@contextmanager
def erased_on_error(progress: Progress) -> Iterator[Progress]:
    """`with progress:`, except that a block that raises leaves no progress display behind."""
    with progress:
        try:
            yield progress
        except BaseException:
            progress.live.transient = True
            raise
