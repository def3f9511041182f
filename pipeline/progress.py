"""Live progress display: one line per stage, bars for epochs with loss/accuracy, and log lines above."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TaskHandle:
    def __init__(self, display: "ProgressDisplay", task_id):
        self._display = display
        self._id = task_id

    def advance(self, n: float = 1, **fields) -> None:
        info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._display._progress.update(self._id, advance=n, info=info)

    def done(self) -> None:
        self._display._progress.remove_task(self._id)


class ProgressDisplay:
    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=False)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not enabled, transient=True,
        )

    @contextmanager
    def live(self) -> Iterator["ProgressDisplay"]:
        with self._progress:
            yield self

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[TaskHandle]:
        handle = TaskHandle(self, self._progress.add_task(description, total=total, info=""))
        try:
            yield handle
        finally:
            handle.done()

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False)
