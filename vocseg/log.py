"""One readable line per event, from the main process only, printed above any tqdm bar."""

from __future__ import annotations

import logging
import os

from tqdm.auto import tqdm


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))  # goes above an active progress bar instead of through it


class _MainProcessOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return int(os.environ.get("RANK", "0")) == 0  # set per process by accelerate launch / torchrun


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    logger = logging.getLogger("vocseg")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
        handler.addFilter(_MainProcessOnly())
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger
