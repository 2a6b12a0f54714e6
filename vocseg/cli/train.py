"""`vocseg train [--config NAME] [--key value ...]` (or `python -m vocseg train`): train a model.

The repository's `train.py` for an installed package (`accelerate launch -m vocseg train ...` for N processes),
without train.py's clearml-agent relaunch: a task replayed by clearml-agent should be started from train.py.
"""

from __future__ import annotations

import logging

from vocseg.config import parse_config
from vocseg.engine import train
from vocseg.summary import print_summary


def main(argv: list[str] | None = None) -> int:
    # Warnings from the libraries; vocseg's own INFO lines come from vocseg.log (main process only).
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING)
    cfg = parse_config(argv)
    results = train(cfg)
    print_summary(cfg, results)
    return 0
