"""`vocseg train [--config NAME] [--key value ...]` (or `python -m vocseg train`, or the repository's train.py).

With no --config: the synthetic quick-start demo, or, when real data is given (--data_root or $DATASET_PATH),
the DeepLabV3-R101 train_aug recipe. Resume a run with `--output_dir RUN --resume_from_checkpoint latest`.
N processes: `accelerate launch [--multi_gpu --num_processes N] train.py ...` (or `-m vocseg train ...`).
Exit codes: 0 finished, 1 failed, 2 usage error, 3 stopped by a signal with a checkpoint saved (resume it).
`--debug` shows tracebacks instead of one-line errors.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import yaml

from vocseg.config import config_from_dict, parse_args
from vocseg.engine import train
from vocseg.errors import EXIT_OK, EXIT_STOPPED, cli_errors, pop_flag
from vocseg.log import setup_logging
from vocseg.summary import print_summary

MODULE_LAUNCH = ["-m", "vocseg", "train"]  # how a launcher starts this command when it is not train.py


def relaunch_under_clearml_agent(launcher_script: list[str]) -> None:
    """clearml-agent replays a task as `python train.py`: one process, no launcher, no precision. Read what the
    task recorded (vocseg.remote) and, for N > 1 processes, start again under `accelerate launch` with N and the
    recorded precision; one process trains in place (the Accelerator takes the recorded precision)."""
    if not os.environ.get("CLEARML_TASK_ID") or "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    from vocseg.remote import relaunch_command, remote_output_dir, replay_settings
    from vocseg.tracking import recorded_task

    task_id = os.environ["CLEARML_TASK_ID"]
    try:
        task_name, parameters = recorded_task(task_id)
    except RuntimeError as error:  # the server does not answer: one line, not a hang or a traceback
        raise SystemExit(f"error: {error}") from None
    settings = replay_settings(parameters)
    print(f"clearml-agent replay of task {task_id} ({task_name}): {settings.num_processes} process(es), "
          f"mixed precision {settings.mixed_precision}, run folder {remote_output_dir(task_name, task_id)}", flush=True)
    command = relaunch_command(launcher_script[0], [*launcher_script[1:], *sys.argv[1:]], settings)
    if command:
        print(f"relaunching: {shlex.join(command)}", flush=True)
        os.execv(sys.executable, command)


def resolved_config(cfg, results: dict):
    """The config the run trained with, as saved in its folder: under clearml-agent it comes from the task,
    not from this command line (which is empty there, i.e. the demo recipe)."""
    saved = Path(results.get("output_dir") or "") / "config.yaml"
    if not saved.is_file():
        return cfg
    return config_from_dict(yaml.safe_load(saved.read_text()))


def main(argv: list[str] | None = None, launcher_script: list[str] = MODULE_LAUNCH) -> int:
    """`launcher_script`: the tokens `accelerate launch` needs to start this program again (a clearml-agent replay
    on N processes): train.py's path, or `-m vocseg train`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Warnings from the libraries; vocseg's own INFO lines come from vocseg.log (main process only).
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING)
    debug = pop_flag(argv, "--debug")
    with cli_errors(debug):
        relaunch_under_clearml_agent(launcher_script)
        parsed = parse_args(argv)
        setup_logging().info(parsed.origin)
        results = train(parsed.cfg)
        print_summary(resolved_config(parsed.cfg, results), results)
    return EXIT_STOPPED if results.get("interrupted") else EXIT_OK
