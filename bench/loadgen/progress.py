"""A one-line progress bar on stderr while a run goes: time gone, requests done, rate, failures.

`render` is pure; `ProgressBar` only writes, and writes nothing when disabled (stderr not a
terminal, or --no-progress). Runs in the CLI process (its event loop or its main thread).
"""

from __future__ import annotations

from typing import TextIO


def render(elapsed_s: float, total_s: float, done: int, failed: int, width: int = 24) -> str:
    fraction = min(1.0, max(0.0, elapsed_s / total_s)) if total_s > 0 else 1.0
    filled = round(fraction * width)
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {min(elapsed_s, total_s):5.1f}/{total_s:.1f} s"
        f"  {done:,} done  {rate:,.0f} req/s  {failed:,} failed"
    )


def enabled_for(stream: TextIO, disabled_by_flag: bool) -> bool:
    return not disabled_by_flag and stream.isatty()


class ProgressBar:
    def __init__(self, stream: TextIO, enabled: bool, total_s: float) -> None:
        self._stream, self._enabled, self._total_s = stream, enabled, total_s
        self._shown = False

    def update(self, elapsed_s: float, done: int, failed: int) -> None:
        if self._enabled:
            self._stream.write("\r" + render(elapsed_s, self._total_s, done, failed))
            self._stream.flush()
            self._shown = True

    def close(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()
            self._shown = False
