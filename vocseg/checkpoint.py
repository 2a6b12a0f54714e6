"""Atomic, resumable checkpoints under output_dir/checkpoints/step_XXXXXXX/.

`accelerator.save_state` writes into a temp folder outside checkpoints/, which is renamed into
place only when complete: whatever sits in checkpoints/ is always whole, so `latest` never picks
a half-written one after a crash.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


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
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such checkpoint folder")
    return path


def save_checkpoint(accelerator, output_dir, step: int, total_limit: int | None) -> Path:
    """Save on every process (each writes its own RNG state); rename and prune on the main process."""
    output_dir = Path(output_dir)
    final = output_dir / "checkpoints" / checkpoint_name(step)
    staging = output_dir / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old = None
        if final.exists():  # left by an abandoned run this one resumed before: the new state replaces it
            old = output_dir / f".trash-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        staging.rename(final)
        if old is not None:
            shutil.rmtree(old)
        for newer in list_checkpoints(output_dir):  # steps ahead of this one belong to a run resumed from earlier
            if int(CHECKPOINT_PATTERN.match(newer.name).group(1)) > step:
                trash = output_dir / f".trash-{newer.name}"
                newer.rename(trash)
                shutil.rmtree(trash)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                trash = output_dir / f".trash-{old.name}"
                old.rename(trash)  # out of checkpoints/ first, so a crash mid-delete leaves nothing half there
                shutil.rmtree(trash)
    accelerator.wait_for_everyone()
    return final
