"""A run folder belongs to one run: claimed under a lock, never silently reused, resumed only with its own config.

- A fresh run refuses a non-empty output_dir; `--overwrite_output_dir` moves the old content aside to
  `<output_dir>.replaced-<time>/` (nothing is deleted).
- `output_dir/.vocseg.lock` is held for the run's life. A lock whose process is gone (same host, pid no longer
  running) is stale and taken over with a warning; a live one refuses the second run.
- Resuming starts from the run's own config; flags that change it are refused with the list of differences
  unless `--allow_config_change` (then recorded in config_changes.jsonl; config.yaml keeps the original).
- Multi-process: the main process decides, every rank checks it sees the same folder (else output_dir is not
  on a filesystem all nodes share) and all ranks learn an error together instead of hanging in a collective.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import gather_object

from vocseg.checkpoint import clean_stale_temporaries, resolve_resume, supersede_later_checkpoints
from vocseg.errors import UsageError

logger = logging.getLogger("vocseg")

LOCK_FILE = ".vocseg.lock"
CHANGES_FILE = "config_changes.jsonl"
# Keys that say how a run is operated, not what it trains: they may differ when resuming. The layout keys
# (per-device batch, accumulation) are checked by the loop position instead: the global batch must stay.
OPERATIONAL_KEYS = frozenset({
    "output_dir", "run_name", "resume_from_checkpoint", "overwrite_output_dir", "allow_config_change",
    "logging_steps", "eval_steps", "checkpointing_steps", "checkpoints_total_limit", "tracker", "clearml_project",
    "clearml_task_name", "clearml_output_uri", "clearml_queue", "num_debug_samples", "num_processes", "num_workers",
    "cache_dir", "per_device_eval_batch_size", "max_eval_samples", "max_eval_size", "bad_samples", "on_nonfinite",
    "max_nonfinite_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
})


# ------------------------------------------------------------------------------------------------------ lock

def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (tells a live owner from a recycled pid); None if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    pid = int(owner.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = _process_start(pid)
    return start is None or owner.get("start") in (None, start)


@dataclass
class RunLock:
    path: Path
    token: str

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def acquire_lock(output_dir: Path) -> RunLock:
    """Create output_dir/.vocseg.lock atomically; take over a stale one; refuse a live one."""
    path = output_dir / LOCK_FILE
    token = uuid.uuid4().hex
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
             "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": token}
    for _ in range(2):
        try:
            with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
                json.dump(owner, f)
            return RunLock(path, token)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == socket.gethostname() and not _alive(holder):
                logger.warning(f"{path}: taking over a stale lock of pid {holder.get('pid')} (no longer running)")
                path.unlink(missing_ok=True)
                continue
            where = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}"
            hint = "" if holder.get("host") == socket.gethostname() else \
                f"; if that run is gone, delete {path}"
            raise UsageError(f"{output_dir} is in use by another run ({where}): wait for it or use another "
                             f"--output_dir{hint}") from None
    raise UsageError(f"could not take the lock {path}")


# ------------------------------------------------------------------------------------------- claiming a folder

def _move_contents_aside(output_dir: Path, why: str) -> Path:
    target = output_dir.with_name(f"{output_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 0
    while target.exists():
        suffix += 1
        target = output_dir.with_name(f"{output_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
    target.mkdir(parents=True)
    for entry in output_dir.iterdir():
        if entry.name != LOCK_FILE:
            entry.rename(target / entry.name)
    logger.warning(f"moved the previous content of {output_dir} to {target} ({why})")
    return target


def _folder_taken(output_dir: Path, contents: list[str]) -> UsageError:
    shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
    return UsageError(f"output_dir {output_dir} already holds a run ({shown}): resume it with --output_dir "
                      f"{output_dir} --resume_from_checkpoint latest, choose another --output_dir, or pass "
                      "--overwrite_output_dir to move it aside")


def check_output_dir_free(output_dir: Path, resume_requested: str | None, overwrite: bool) -> None:
    """The early, read-only version of claim_folder's refusals (before a ClearML task is created for nothing)."""
    if not output_dir.is_dir():
        return
    lock = output_dir / LOCK_FILE
    if lock.is_file():
        try:
            holder = json.loads(lock.read_text())
        except (OSError, ValueError):
            holder = {}
        if holder.get("host") != socket.gethostname() or _alive(holder):
            raise UsageError(f"{output_dir} is in use by another run (pid {holder.get('pid', '?')} on host "
                             f"{holder.get('host', '?')} since {holder.get('since', '?')}): wait for it or use "
                             "another --output_dir")
    contents = sorted(e.name for e in output_dir.iterdir() if e.name != LOCK_FILE)
    if contents and not resume_requested and not overwrite:
        raise _folder_taken(output_dir, contents)


def claim_folder(output_dir: Path, resume_requested: str | None, overwrite: bool) -> tuple[RunLock, Path | None]:
    """Main process: lock the folder, decide what to resume, refuse (or move aside) someone else's run."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output_dir {output_dir} is a file, not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(output_dir)
    try:
        resume = resolve_resume(resume_requested, output_dir)
        contents = sorted(e.name for e in output_dir.iterdir() if e.name != LOCK_FILE)
        if resume is None and contents:
            if resume_requested:  # asked to continue, nothing to continue from: keep the old files, start afresh
                logger.warning(f"--resume_from_checkpoint {resume_requested}: no complete checkpoint in "
                               f"{output_dir / 'checkpoints'}, starting from step 0")
                _move_contents_aside(output_dir, "nothing to resume from it")
            elif overwrite:
                _move_contents_aside(output_dir, "--overwrite_output_dir")
            else:
                raise _folder_taken(output_dir, contents)
        elif resume is None and resume_requested:
            logger.warning(f"--resume_from_checkpoint {resume_requested}: no complete checkpoint in "
                           f"{output_dir / 'checkpoints'}, starting from step 0")
        clean_stale_temporaries(output_dir)
        if resume is not None:
            supersede_later_checkpoints(output_dir, resume)
    except BaseException:
        lock.release()
        raise
    return lock, resume


# --------------------------------------------------------------------------------------------- config on resume

def config_differences(saved: dict, cfg_values: dict) -> dict[str, tuple]:
    """Keys whose value would change what the run trains, with (saved, requested)."""
    return {k: (saved[k], v) for k, v in cfg_values.items()
            if k in saved and k not in OPERATIONAL_KEYS and saved[k] != v}


def check_resume_config(saved: dict, cfg_values: dict, allow: bool, output_dir: Path, resumed: Path) -> dict:
    """Refuse a resume that changes the run's config, or record the change when allowed."""
    changes = config_differences(saved, cfg_values)
    if changes and not allow:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))
        raise UsageError(f"resuming {output_dir} with a different config ({listed}): drop those flags to resume "
                         "the run as it was, or pass --allow_config_change to continue with them (recorded)")
    if changes:
        record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed_from": str(resumed),
                  "changes": {k: list(v) for k, v in changes.items()}}
        with (output_dir / CHANGES_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")
        logger.warning(f"resuming with a changed config (recorded in {output_dir / CHANGES_FILE}): "
                       + "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items())))
    return changes


# ------------------------------------------------------------------------------------ every rank, together

def check_shared_folder(state, output_dir: Path, token: str) -> None:
    """Every rank must see the main process's lock file in output_dir (multi-node: a shared filesystem)."""
    if state.num_processes == 1:
        return
    try:
        seen = json.loads((output_dir / LOCK_FILE).read_text()).get("token")
    except (OSError, ValueError):
        seen = None
    answers = gather_object([(state.process_index, socket.gethostname(), seen == token)])
    blind = [(rank, host) for rank, host, ok in answers if not ok]
    if blind:
        who = ", ".join(f"rank {rank} on {host}" for rank, host in blind)
        raise UsageError(f"output_dir {output_dir} is not shared: {who} cannot see the main process's files in "
                         "it; put output_dir on a filesystem all nodes share (checkpoints are written by the "
                         "main process and read by every rank on resume)")
