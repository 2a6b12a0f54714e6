"""Train a VOC segmentation model:  accelerate launch train.py [--config configs/NAME.yaml] [--key value ...]

With no arguments (and no DATASET_PATH) this is the quick-start demo on synthetic data.
"""

import logging
import sys

from vocseg.config import parse_config
from vocseg.engine import train
from vocseg.summary import print_summary

if __name__ == "__main__":
    # Warnings from the libraries; vocseg's own INFO lines come from vocseg.log (main process only).
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING)
    cfg = parse_config()
    results = train(cfg)
    print_summary(cfg, results)
    sys.exit(0)
