"""Train a VOC segmentation model:  accelerate launch train.py [--config configs/NAME.yaml] [--key value ...]

With no --config: the synthetic quick-start demo, or, when real data is given (--data_root or $DATASET_PATH),
the DeepLabV3-R101 train_aug recipe. Resume a run with `--output_dir RUN --resume_from_checkpoint latest`.
Exit codes: 0 finished, 1 failed, 2 usage error, 3 stopped by a signal with a checkpoint saved (resume it).
`--debug` shows tracebacks instead of one-line errors.
"""

import logging
import os
import sys

from vocseg.config import parse_args
from vocseg.engine import train
from vocseg.errors import EXIT_OK, EXIT_STOPPED, cli_errors, pop_flag
from vocseg.log import setup_logging
from vocseg.summary import print_summary


def relaunch_under_clearml_agent() -> None:
    """clearml-agent replays a task as `python train.py`: one process. If the task was recorded with
    N > 1 processes, start it again under `accelerate launch` with N, so the replay matches the original."""
    if not os.environ.get("CLEARML_TASK_ID") or "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    from clearml import Task

    task = Task.get_task(task_id=os.environ["CLEARML_TASK_ID"])
    processes = int(float(task.get_parameter("General/num_processes") or 1))
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), os.path.abspath(__file__), *sys.argv[1:]]
        print(f"clearml-agent replay: relaunching with {processes} processes: {' '.join(command)}", flush=True)
        os.execv(sys.executable, command)


def main(argv: list[str]) -> int:
    # Warnings from the libraries; vocseg's own INFO lines come from vocseg.log (main process only).
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING)
    debug = pop_flag(argv, "--debug")
    with cli_errors(debug):
        relaunch_under_clearml_agent()
        parsed = parse_args(argv)
        setup_logging().info(parsed.origin)
        results = train(parsed.cfg)
        print_summary(parsed.cfg, results)
    return EXIT_STOPPED if results.get("interrupted") else EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
