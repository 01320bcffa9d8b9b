"""What a sweep shows while it runs: one line of rich progress, and each failure as it happens.

    points 3/8 · failed 1 (gptq 1) ━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 412/1600 utterances 3.1 utt/s 0:06:23

Utterances count as they are journaled by the shards (the runner reads the journals' lengths),
so the rate and the estimate of the time left move during a long shard, not only at its end;
utterances a resumed sweep found already done are in the count but not in the rate. The
summary table and the chart at the end are the command line's (`qbench.cli.cmd_sweep`).
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from qbench.sweep.state import PointRecord


class SweepProgress(Protocol):
    def note(self, message: str) -> None:
        """A one-line statement of what the sweep is doing or found."""

    def start(self, points: int, done_points: int) -> None:
        """The sweep starts with `points` points, of which `done_points` were finished before."""

    def utterances(self, done: int, total: int) -> None:
        """`done` of the sweep's `total` utterances are finished (the total is exact once every
        point is prepared, and drops the rest of a point that fails)."""

    def point_finished(self, record: PointRecord) -> None:
        """A point ended: complete, failed (with its reason) or not fitting its device."""

    def close(self) -> None:
        """The display ends (the sweep finished or stopped)."""


class SilentSweepProgress:
    def note(self, message: str) -> None:
        pass

    def start(self, points: int, done_points: int) -> None:
        pass

    def utterances(self, done: int, total: int) -> None:
        pass

    def point_finished(self, record: PointRecord) -> None:
        pass

    def close(self) -> None:
        pass


class _Rate(ProgressColumn):
    """Utterances per second over rich's recent window (advances only: resumed ones are not)."""

    def render(self, task: Task) -> Text:
        return Text("- utt/s" if not task.speed else f"{task.speed:.2f} utt/s", style="progress.data.speed")


class RichSweepProgress:
    """`SweepProgress` on stderr: the line above, notes and failures printed above it."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self._points = 0
        self._finished = 0
        self._failed: Counter[str] = Counter()
        self._bar: Progress | None = None
        self._task = None

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def _describe(self) -> str:
        text = f"points {self._finished}/{self._points}"
        if self._failed:
            by_plugin = ", ".join(f"{plugin} {n}" for plugin, n in sorted(self._failed.items()))
            text += f" · failed {sum(self._failed.values())} ({by_plugin})"
        return text

    def start(self, points: int, done_points: int) -> None:
        self._points, self._finished = points, done_points
        self._bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                             TextColumn("utterances"), _Rate(), TimeRemainingColumn(), console=self.console,
                             disable=self.quiet)
        self._bar.start()
        self._task = None

    def utterances(self, done: int, total: int) -> None:
        if self._bar is None:
            return
        if self._task is None:
            # what an earlier run finished is where the bar starts, not an advance: not in the rate
            self._task = self._bar.add_task(self._describe(), total=total, completed=done)
        else:
            self._bar.update(self._task, completed=done, total=total)

    def point_finished(self, record: PointRecord) -> None:
        self._finished += 1
        if record.status == "failed":
            self._failed[record.plugin or "float"] += 1
            self.console.print(Text(f"point {record.name} failed: {record.reason}", style="red"), soft_wrap=True)
        elif record.status == "does-not-fit":
            self.console.print(Text(f"point {record.name}: {record.reason}", style="yellow"), soft_wrap=True)
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=self._describe())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._bar = None
