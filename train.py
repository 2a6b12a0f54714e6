"""Train a VOC segmentation model:  accelerate launch train.py [--config configs/NAME.yaml] [--key value ...]

With no --config: the synthetic quick-start demo, or, when real data is given (--data_root or $DATASET_PATH),
the DeepLabV3-R101 train_aug recipe. Resume a run with `--output_dir RUN --resume_from_checkpoint latest`.
Exit codes: 0 finished, 1 failed, 2 usage error, 3 stopped by a signal with a checkpoint saved (resume it).
`--debug` shows tracebacks instead of one-line errors. The command itself is vocseg/cli/train.py.
"""

import os
import sys

from vocseg.cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], launcher_script=[os.path.abspath(__file__)]))
