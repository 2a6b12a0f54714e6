"""What a run logged every logging_steps (output_dir/train_log.jsonl): {key: [(step, value), ...]}.

The same values go to TensorBoard and ClearML (grouped as loss/train, learning_rate/<group>, ...); the file
holds them under their flat names (train_loss, lr_<group>, train_grad_norm, ...), with any tracker.
"""

from __future__ import annotations

import json
from pathlib import Path


def logged_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    scalars: dict[str, list[tuple[int, float]]] = {}
    for line in (Path(out) / "train_log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for key, value in entry.items():
            if key != "step":
                scalars.setdefault(key, []).append((entry["step"], value))
    return scalars
