"""Atomic, resumable checkpoints under output_dir/checkpoints/step_XXXXXXX/.

`accelerator.save_state` writes into a temp folder outside checkpoints/, which is renamed into
place only when complete: whatever sits in checkpoints/ is always whole, so `latest` never picks
a half-written one after a crash. Each checkpoint also holds `run_config.yaml`, the config it was
trained with, which a resume starts from.

Nothing is deleted silently: checkpoints beyond `checkpoints_total_limit` are removed with a log line,
and checkpoints *later* than the one a run resumes from are moved to checkpoints/superseded-<time>/.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import time
from pathlib import Path

import yaml

from vocseg.errors import DiskFull, UsageError, on_main_then_everywhere

logger = logging.getLogger("vocseg")

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
RUN_CONFIG_FILE = "run_config.yaml"
# Left behind by a crash or a full disk; removed when the next run takes the folder (under its lock).
STALE_TEMPORARIES = (".tmp-step_*", ".trash-step_*", ".best_model.tmp-*", ".best_model.old-*")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(Path(path).name).group(1))


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume_from_checkpoint: str | None, output_dir) -> Path | None:
    """'latest' -> newest complete checkpoint in output_dir (None if there is none); else the given path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir() or not any(path.glob("random_states_*.pkl")) and not any(path.glob("model*.safetensors")):
        raise UsageError(f"--resume_from_checkpoint {path}: not a checkpoint folder (expected "
                         "outputs/RUN/checkpoints/step_NNNNNNN with model.safetensors)")
    return path


def run_config_path(resume_from_checkpoint: str, output_dir: str | None) -> Path | None:
    """The config a resume starts from: the checkpoint's own, else the run's config.yaml; None if neither."""
    if resume_from_checkpoint == "latest":
        if not output_dir:
            raise UsageError("--resume_from_checkpoint latest needs --output_dir (the run folder to resume)")
        checkpoints = list_checkpoints(output_dir)
        candidates = [checkpoints[-1] / RUN_CONFIG_FILE] if checkpoints else []
        candidates.append(Path(output_dir) / "config.yaml")
    else:
        checkpoint = Path(resume_from_checkpoint)
        candidates = [checkpoint / RUN_CONFIG_FILE, checkpoint.parent.parent / "config.yaml"]
    return next((c for c in candidates if c.is_file()), None)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _is_disk_full(error: BaseException, free: int, needed: int) -> bool:
    """ENOSPC, or a writer's vague I/O error (torch: 'iostream error', 'unexpected pos') with the disk nearly full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return free < max(needed, 1)


def _check_free_space(output_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(output_dir).free
    if needed and free < needed:
        raise DiskFull(f"not enough space for a checkpoint in {output_dir}: {needed} bytes needed (the size of the "
                       f"previous checkpoint), {free} free; free some space (or lower checkpoints_total_limit) and "
                       "resume")


def save_checkpoint(accelerator, output_dir, step: int, total_limit: int | None,
                    run_config: dict | None = None) -> Path:
    """Save on every process (each writes its own RNG state); check space, rename and prune on the main process."""
    output_dir = Path(output_dir)
    final = output_dir / "checkpoints" / checkpoint_name(step)
    staging = output_dir / f".tmp-{checkpoint_name(step)}"
    previous = list_checkpoints(output_dir)
    needed = folder_size(previous[-1]) if previous else 0

    def prepare() -> None:
        shutil.rmtree(staging, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        _check_free_space(output_dir, needed)

    on_main_then_everywhere(accelerator, prepare)  # a full disk stops every rank, not the main one alone
    try:
        accelerator.save_state(str(staging))
        if accelerator.is_main_process and run_config is not None:
            (staging / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run_config, sort_keys=False))
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)  # a partial checkpoint would only fill the disk further
        free = shutil.disk_usage(output_dir).free
        if _is_disk_full(error, free, needed):
            raise DiskFull(f"disk full while writing a checkpoint to {output_dir}: about {needed or 'unknown'} "
                           f"bytes needed, {free} free ({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
                           "free some space and resume") from error
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # never expected (later steps are moved aside on resume); keep it rather than lose it
            _move_aside(final.parent, [final], "an existing checkpoint of the same step")
        staging.rename(final)
        _prune(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _prune(output_dir: Path, total_limit: int | None) -> None:
    if not total_limit:
        return
    for old in list_checkpoints(output_dir)[:-total_limit]:
        trash = output_dir / f".trash-{old.name}"
        old.rename(trash)  # out of checkpoints/ first, so a crash mid-delete leaves nothing half there
        shutil.rmtree(trash)
        logger.info(f"removed {old.name} (checkpoints_total_limit {total_limit})")


def _move_aside(checkpoints_dir: Path, paths: list[Path], why: str) -> Path:
    target = checkpoints_dir / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while target.exists():
        suffix += 1
        target = checkpoints_dir / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    target.mkdir(parents=True)
    for path in paths:
        path.rename(target / path.name)
    logger.warning(f"moved {', '.join(p.name for p in paths)} to {target}: {why}")
    return target


def supersede_later_checkpoints(output_dir, resumed: Path) -> Path | None:
    """Resuming from an earlier checkpoint: its later ones (and a best_model exported after it) belong to the
    abandoned future; move them aside, so `latest` and the best score are the resumed run's."""
    if Path(resumed).resolve().parent != (Path(output_dir) / "checkpoints").resolve():
        return None
    later = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) > checkpoint_step(resumed)]
    best = Path(output_dir) / "best_model"
    try:
        best_step = json.loads((best / "vocseg_model.json").read_text()).get("step", -1)
    except (OSError, ValueError):
        best_step = -1
    if best_step > checkpoint_step(resumed):
        later.append(best)
    if not later:
        return None
    return _move_aside(Path(output_dir) / "checkpoints", later, f"the run resumes from the earlier {resumed.name}")


def clean_stale_temporaries(output_dir) -> list[str]:
    """Temp folders of crashed or disk-full saves; called while holding the folder's lock."""
    removed = []
    for pattern in STALE_TEMPORARIES:
        for path in Path(output_dir).glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        logger.info(f"removed {len(removed)} temporary folder(s) left by an interrupted save: {', '.join(removed)}")
    return removed
