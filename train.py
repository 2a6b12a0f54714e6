"""Train a VOC segmentation model:  accelerate launch train.py [--config configs/NAME.yaml] [--key value ...]

With no arguments (and no DATASET_PATH) this is the quick-start demo on synthetic data.
"""

import logging
import os
import sys

from vocseg.config import parse_config
from vocseg.engine import train
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


if __name__ == "__main__":
    # Warnings from the libraries; vocseg's own INFO lines come from vocseg.log (main process only).
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING)
    relaunch_under_clearml_agent()
    cfg = parse_config()
    results = train(cfg)
    print_summary(cfg, results)
    sys.exit(0)
