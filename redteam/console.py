"""Terminal output: results on stdout, progress and errors on stderr (rich).

On a terminal, progress is a live rich bar and tables fit the window. Off one (a pipe, a CI log), tables are
:data:`PLAIN_WIDTH` columns wide and progress is plain lines: each task when it
starts and ends, and every :data:`PLAIN_EVERY_S` seconds in between, so a long run never looks hung.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: Width of tables off a terminal (a pipe, a CI log, which do not wrap lines), where rich would assume 80 columns.
PLAIN_WIDTH = 120
console = Console()
errors = Console(stderr=True)
for _stream in (console, errors):
    if not _stream.is_terminal and "COLUMNS" not in os.environ:
        _stream.width = PLAIN_WIDTH
#: Seconds between plain progress lines when stderr is not a terminal.
PLAIN_EVERY_S = 30.0

#: ``bar(what, total)`` starts a progress task and returns its ``advance(n)``.
Bar = Callable[[str, int], Callable[[int], None]]


class Tracker(Protocol):
    """What redteam asks of a progress display (rich's ``Progress`` and :class:`PlainProgress` both have it). Task
    ids are rich's ``TaskID`` (an int); ``total`` is keyword-only, as rich's second parameter is ``start``."""

    def add_task(self, description: str, *, total: float | None = ...) -> TaskID: ...

    def advance(self, task_id: TaskID, advance: float = ...) -> None: ...


@dataclass
class _PlainTask:
    description: str
    total: float | None
    done: float = 0.0
    finished: bool = False
    started: float = field(default_factory=time.monotonic)


class PlainProgress:
    """Progress as plain lines on ``output``, for logs."""

    def __init__(self, output: Console, every: float = PLAIN_EVERY_S):
        self.output, self.every = output, every
        self.tasks: list[_PlainTask] = []
        self.last_line = time.monotonic()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for number, task in enumerate(self.tasks):
            if not task.finished:
                self._line(number, "stopped" if error else "done")

    def add_task(self, description: str, total: float | None = None) -> TaskID:
        self.tasks.append(_PlainTask(description, total))
        self._line(len(self.tasks) - 1, "started")
        return TaskID(len(self.tasks) - 1)  # its index in tasks

    def advance(self, task_id: int, advance: float = 1) -> None:
        task = self.tasks[task_id]
        task.done += advance
        if task.finished:
            return
        if task.total is not None and task.done >= task.total:
            task.finished = True
            self._line(task_id, "done")
        elif time.monotonic() - self.last_line >= self.every:
            self._line(task_id, "")

    def _line(self, task_id: int, event: str) -> None:
        task = self.tasks[task_id]
        count = f"{task.done:g}/{task.total:g}" if task.total is not None else f"{task.done:g}"
        elapsed = time.monotonic() - task.started
        self.output.print(f"{escape(task.description)}: {count} · {elapsed:.0f} s {event}".rstrip(), highlight=False)
        self.last_line = time.monotonic()


def progress() -> Progress | PlainProgress:
    """A progress display on stderr: a live bar on a terminal, plain lines elsewhere."""
    if not errors.is_terminal:
        return PlainProgress(errors)
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=errors,
        transient=False,
    )


def bars(tracker: Tracker) -> Bar:
    """``bar(what, total)`` over ``tracker``: one task per call, its ``advance(n)`` returned."""

    def bar(what: str, total: int) -> Callable[[int], None]:
        task = tracker.add_task(what, total=total)
        return lambda n: tracker.advance(task, n)

    return bar
