"""A progress bar on stderr while a run goes (rich's): time gone of the run's length, requests
done, their rate and failures.

Runs in the CLI process (its event loop or its main thread). It draws only when `update` is
called (no refresh thread, which would count in the generator's own CPU), and nothing at all
when disabled (stderr not a terminal, or --no-progress).
"""

from __future__ import annotations

from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

BAR_WIDTH = 24


def enabled_for(stream: TextIO, disabled_by_flag: bool) -> bool:
    return not disabled_by_flag and stream.isatty()


class ProgressBar:
    def __init__(self, stream: TextIO, enabled: bool, total_s: float) -> None:
        self._stream, self._enabled, self._total_s = stream, enabled, total_s
        self._shown: tuple[Progress, TaskID] | None = None  # made at the first update

    def update(self, elapsed_s: float, done: int, failed: int) -> None:
        if not self._enabled:
            return
        if self._shown is None:
            self._shown = self._start()
        progress, task = self._shown
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        completed = min(max(elapsed_s, 0.0), self._total_s)
        progress.update(task, completed=completed, done=done, rate=rate, failed=failed)
        progress.refresh()

    def close(self) -> None:
        if self._shown is not None:
            self._shown[0].stop()  # leaves the last state drawn, and the cursor below it
            self._shown = None

    def _start(self) -> tuple[Progress, TaskID]:
        progress = Progress(
            BarColumn(bar_width=BAR_WIDTH),
            TextColumn("{task.completed:5.1f}/{task.total:.1f} s"),
            TextColumn(
                "{task.fields[done]:,} done  {task.fields[rate]:,.0f} req/s  "
                "{task.fields[failed]:,} failed"
            ),
            console=Console(file=self._stream),
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        task = progress.add_task("run", total=self._total_s, done=0, rate=0.0, failed=0)
        progress.start()
        return progress, task
