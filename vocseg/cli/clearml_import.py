"""`python -m vocseg clearml-import SESSION.zip`: upload an offline ClearML session to the configured server,
and register the run's best model from its folder.

The session carries the script section (repository, commit, diff, entry point, packages) that vocseg records
offline, so the imported task can be cloned and enqueued for clearml-agent like any other.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vocseg.errors import OneLineArgumentParser


def recorded_run_folder(session: Path) -> Path | None:
    """The run folder the offline run recorded (user property `run_folder`), if any."""
    from vocseg.cli.compare import load_run

    folder = load_run(str(session))["params"].get("properties/run_folder")
    return Path(folder) if folder else None


def best_model_scores(folder: Path) -> tuple[int, float] | None:
    """(step, val mIoU) written by the training run into the export's vocseg_model.json; None if absent."""
    from vocseg.models import META_FILE

    meta_file = folder / META_FILE
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    if "step" not in meta or meta.get("eval_mean_iou") is None:
        return None
    return int(meta["step"]), float(meta["eval_mean_iou"])


def default_upload_uri() -> str | None:
    """$CLEARML_OUTPUT_URI, else clearml.conf's sdk.development.default_output_uri; None: register in place."""
    if os.environ.get("CLEARML_OUTPUT_URI"):
        return os.environ["CLEARML_OUTPUT_URI"]
    from clearml.config import config

    return config.get("sdk.development.default_output_uri", None) or None


def register_run_best_model(task_id: str, run_folder: Path | None, upload_uri: str | None) -> str:
    """Register `run_folder/best_model` on the imported task; returns what happened, in one line."""
    if run_folder is None:
        return "no run folder recorded in the session (pass --run_dir): no model registered"
    best = run_folder / "best_model"
    scores = best_model_scores(best)
    if scores is None:
        return f"no trained best model in {best}: no model registered"
    from clearml import Task

    from vocseg.tracking import register_best_model

    task = Task.get_task(task_id=task_id)
    task.mark_started(force=True)  # the import closed the task; models are attached to running tasks
    model = register_best_model(task, best, step=scores[0], miou=scores[1], upload_uri=upload_uri)
    task.mark_completed()
    where = f"uploaded to {upload_uri}" if upload_uri else "registered in place (no upload destination)"
    return f"registered {best} as model {model.id} (mIoU {scores[1]:.4f} at step {scores[0]}), {where}"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m vocseg clearml-import", description=__doc__.split("\n")[0])
    parser.add_argument("session", help="offline session zip (or folder) printed at the end of an offline run")
    parser.add_argument("--run_dir", help="the run's output folder (default: the one recorded in the session)")
    parser.add_argument("--output_uri", help="upload the best model there (default: $CLEARML_OUTPUT_URI or "
                                             "clearml.conf's default_output_uri; none: register it in place)")
    args = parser.parse_args(argv)
    session = Path(args.session)
    if not session.exists():
        print(f"error: {session} does not exist", file=sys.stderr)
        return 2
    from vocseg.clearml_connection import server_unavailable_reason

    reason = server_unavailable_reason()  # the SDK would retry a silent server for minutes
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    from clearml import Task

    task_id = Task.import_offline_session(str(session))
    if not task_id:
        print(f"error: ClearML did not import {session}", file=sys.stderr)
        return 1
    print(f"imported {session} as ClearML task {task_id}")
    run_folder = Path(args.run_dir) if args.run_dir else recorded_run_folder(session)
    print(register_run_best_model(task_id, run_folder, args.output_uri or default_upload_uri()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
