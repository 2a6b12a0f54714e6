"""Progress that reads well both in a terminal and in a log file.

In a terminal (stderr is a TTY) the main process shows a tqdm bar and log lines print above it. Written to a
file, bars are off: their carriage-return redraws turn a log into soup. The training log line carries what the
bar would (step/total, ETA, throughput) every `logging_steps`. `TQDM_DISABLE=1` turns bars off everywhere.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm

_FALSE = ("", "0", "false", "no", "off")


def bars_enabled(is_main_process: bool = True) -> bool:
    if not is_main_process or os.environ.get("TQDM_DISABLE", "").strip().lower() not in _FALSE:
        return False
    return sys.stderr.isatty()


def progress_bar(iterable=None, **kwargs):
    """tqdm where a bar helps (main process, terminal), a plain pass-through iterator elsewhere."""
    return tqdm(iterable, disable=not bars_enabled(kwargs.pop("main_process", True)), **kwargs)


class TrainProgress:
    """Steps done, ETA and a bar (terminal only) for the training loop."""

    def __init__(self, total: int, initial: int, is_main_process: bool):
        self.total, self.start_step, self.start_time = total, initial, time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, desc="train", disable=not bars_enabled(is_main_process),
                        dynamic_ncols=True)

    def update(self, step: int) -> None:
        if not self.bar.disable:
            self.bar.update(step - self.bar.n)

    def eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        seconds = (time.perf_counter() - self.start_time) / done * (self.total - step)
        return format_duration(seconds)

    def close(self) -> None:
        self.bar.close()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
