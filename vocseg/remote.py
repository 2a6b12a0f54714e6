"""What a run replayed by clearml-agent decides, as plain functions (no ClearML calls, tested directly).

A task cloned in the ClearML UI (or spawned by the HyperParameterOptimizer) carries every hyperparameter of
its original, including `General/output_dir`, `run_name` and `resume_from_checkpoint`. Replayed as such,
a clone would train into the original's folder, prune its checkpoints and replace its best model. So
under the agent:

- the run folder is the task's own: `<root>/<task name>-<task id>` (root `outputs`, or $VOCSEG_OUTPUT_ROOT);
- a recorded `resume_from_checkpoint` is never inherited: the run resumes only from its own folder, which
  holds checkpoints only when this very task ran before (a preempted worker restarting it);
- the precision and the number of processes are the recorded ones: the agent starts `python train.py`,
  one process and no launcher, so train.py relaunches itself with them (`relaunch_command`).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from vocseg.config import ConfigError, TrainConfig, coerce_value

PRECISIONS = ("no", "fp16", "bf16")
OUTPUT_ROOT_ENV = "VOCSEG_OUTPUT_ROOT"


def output_root() -> Path:
    """Where replayed runs put their folders. The agent's working copy of the repository may be recreated
    for the next task, so a worker that should keep its runs sets $VOCSEG_OUTPUT_ROOT to a lasting place."""
    return Path(os.environ.get(OUTPUT_ROOT_ENV) or "outputs")


def safe_folder_name(name: str, max_length: int = 80) -> str:
    """A task name as one folder name: letters, digits, '.', '_' and '-' only ("Clone Of x/y" -> "Clone_Of_x_y")."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return cleaned[:max_length].rstrip("._-") or "task"


def remote_output_dir(task_name: str, task_id: str, root: str | os.PathLike | None = None) -> Path:
    """The run folder of a task replayed by the agent: `<root>/<task name>-<task id>`.

    If a folder of this task id already exists (the task ran here before and was renamed since), that one:
    the id, not the name, says whose folder it is.
    """
    root = Path(root) if root is not None else output_root()
    if not re.fullmatch(r"[A-Za-z0-9_-]+", task_id):
        raise ValueError(f"unexpected ClearML task id {task_id!r}")
    existing = sorted(p for p in root.glob(f"*-{task_id}") if p.is_dir()) if root.is_dir() else []
    return existing[0] if existing else root / f"{safe_folder_name(task_name)}-{task_id}"


def remote_resume(output_dir: str | os.PathLike) -> str | None:
    """'latest' when the task's own folder exists (this very task ran before and stopped): it resumes its
    latest complete checkpoint, or, with none yet, moves its partial files aside and starts again
    (vocseg.run_folder). None for a new folder: a clone starts from step 0 whatever its original recorded."""
    folder = Path(output_dir)
    return "latest" if folder.is_dir() and any(folder.iterdir()) else None


def remote_run_config(cfg: TrainConfig, task_name: str, task_id: str, root: str | os.PathLike | None = None
                      ) -> TrainConfig:
    """The config a replayed task trains with: the recorded one, in the task's own folder, resuming only itself."""
    output_dir = remote_output_dir(task_name, task_id, root)
    return replace(cfg, output_dir=str(output_dir), run_name=output_dir.name,
                   resume_from_checkpoint=remote_resume(output_dir))


def resolve_mixed_precision(configured: str | None, launcher: str | None = None) -> str:
    """The precision a run trains in: the config's when set, else the launcher's ($ACCELERATE_MIXED_PRECISION,
    which `accelerate launch` sets from its flag or config file), else fp32 ('no')."""
    if configured is None:
        configured = launcher if launcher is not None else os.environ.get("ACCELERATE_MIXED_PRECISION")
    value = (configured or "no").strip().lower()
    if value not in PRECISIONS:
        raise ConfigError(f"mixed precision {configured!r} is not supported: use one of {', '.join(PRECISIONS)}")
    return value


@dataclass(frozen=True)
class ReplaySettings:
    """What a replay must reproduce that is not in the training code: the process count and the precision."""
    num_processes: int
    mixed_precision: str


def replay_settings(parameters: dict) -> ReplaySettings:
    """From the task's recorded hyperparameters (strings, as ClearML returns them: 'General/num_processes' ...).

    A task recorded before `mixed_precision` existed replays in fp32, as it then did under the agent.
    """
    hints = {"General/num_processes": int | None, "General/mixed_precision": str | None}
    values = {k: coerce_value(t, parameters.get(k), k) for k, t in hints.items()}
    processes = 1 if values["General/num_processes"] is None else values["General/num_processes"]
    if processes < 1:
        raise ConfigError(f"General/num_processes must be at least 1, got {processes}")
    return ReplaySettings(num_processes=processes,
                          mixed_precision=resolve_mixed_precision(values["General/mixed_precision"] or "no"))


def relaunch_command(script: str, args: list[str], settings: ReplaySettings, python: str = sys.executable
                     ) -> list[str] | None:
    """The command that replays a multi-process task under `accelerate launch`; None for one process, which
    trains in place (the Accelerator is built with the recorded precision, no launcher needed)."""
    if settings.num_processes <= 1:
        return None
    return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(settings.num_processes),
            "--num_machines", "1", "--mixed_precision", settings.mixed_precision, "--dynamo_backend", "no",
            script, *args]
