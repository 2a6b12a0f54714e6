"""One readable line per event, from the main process only, printed above any tqdm bar."""

from __future__ import annotations

import logging
import os

from tqdm.auto import tqdm

from vocseg.progress import bars_enabled


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))  # goes above an active progress bar instead of through it


class _MainProcessOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return int(os.environ.get("RANK", "0")) == 0  # set per process by accelerate launch / torchrun


def quiet_library_progress_bars() -> None:
    """datasets / transformers / huggingface_hub draw their own bars; in a log file they are carriage-return soup."""
    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    logger = logging.getLogger("vocseg")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(_MainProcessOnly())
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    if not bars_enabled():
        quiet_library_progress_bars()
    return logger
