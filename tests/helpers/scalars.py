"""Scalars a run logged with `--tracker tensorboard`: {tag: [(step, value), ...]}, every event file under a run."""

from __future__ import annotations

from pathlib import Path


def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for folder in sorted({f.parent for f in Path(out).rglob("events.out.tfevents.*")}):
        events = EventAccumulator(str(folder))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return scalars
