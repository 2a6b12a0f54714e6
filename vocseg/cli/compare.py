"""`python -m vocseg compare RUN RUN ...`: hyperparameters that differ and final/best metrics, side by side.

RUN is an offline session folder or zip (works without any server), a ClearML task id, or a
"project/task name" query.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import zipfile
from pathlib import Path

from vocseg.clearml_connection import ClearMLTimeout, deadline, deadline_seconds, server_unavailable_reason
from vocseg.constants import VOC_CLASSES
from vocseg.errors import OneLineArgumentParser

METRICS = (("mIoU", "val"), ("mAcc", "val"), ("aAcc", "val"))


def _offline_session(path: Path) -> dict:
    """Read task.json + metrics.jsonl from an offline session folder or its zip."""
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()

            def read(name):
                match = next((n for n in names if n.endswith(name)), None)
                return archive.read(match).decode() if match else ""
            task_json, metrics = read("task.json"), read("metrics.jsonl")
    else:
        task_json = (path / "task.json").read_text()
        metrics_file = path / "metrics.jsonl"
        metrics = metrics_file.read_text() if metrics_file.exists() else ""
    task = json.loads(task_json)
    params = {f"{section}/{name}": entry.get("value", "")
              for section, entries in (task.get("hyperparams") or {}).items() for name, entry in entries.items()}
    scalars: dict = {}
    for line in metrics.splitlines():
        for event in json.loads(line):
            if event.get("type") == "training_stats_scalar":
                series = scalars.setdefault(event["metric"], {}).setdefault(event["variant"], [])
                series.append((event["iter"], event["value"]))
    return {"name": task.get("name", path.name), "id": task.get("id", ""), "params": params, "scalars": scalars}


def _server_task(run: str) -> dict:
    """A task on the server, read within the deadline (the SDK alone would retry a silent server for minutes)."""
    from clearml import Task

    with deadline(deadline_seconds(), f"reading {run} from the ClearML server"):
        if "/" in run:
            project, name = run.rsplit("/", 1)
            task = Task.get_task(project_name=project, task_name=name)
        else:
            task = Task.get_task(task_id=run)
        scalars = {title: {series: list(zip(values["x"], values["y"])) for series, values in by_series.items()}
                   for title, by_series in task.get_reported_scalars().items()}
        return {"name": task.name, "id": task.id, "params": dict(task.get_parameters()), "scalars": scalars}


def load_run(run: str) -> dict:
    path = Path(run)
    if path.exists():
        return _offline_session(path)
    return _server_task(run)


def _final_and_best(run: dict, title: str, series: str) -> tuple[str, str]:
    points = sorted(run["scalars"].get(title, {}).get(series, []))
    if not points:
        return "-", "-"
    return f"{points[-1][1]:.4f}", f"{max(v for _, v in points):.4f}"


def comparison_rows(runs: list[dict], all_params: bool = False) -> list[list[str]]:
    rows = [["", *[r["name"] for r in runs]]]
    keys = sorted({k for r in runs for k in r["params"]})
    for key in keys:
        values = [str(r["params"].get(key, "-")) for r in runs]
        if all_params or len(set(values)) > 1:
            rows.append([key, *values])
    for title, series in METRICS:
        finals, bests = zip(*[_final_and_best(r, title, series) for r in runs])
        rows.append([f"{title} ({series}) final", *finals])
        rows.append([f"{title} ({series}) best", *bests])
    for name in VOC_CLASSES:
        rows.append([f"IoU {name} final", *[_final_and_best(r, "IoU per class", name)[0] for r in runs]])
    return rows


def to_text(rows) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in rows)


def to_markdown(rows) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m vocseg compare", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="offline session folders/zips, task ids, or project/name")
    parser.add_argument("--all", action="store_true", help="show every hyperparameter, not only those that differ")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    parser.add_argument("--csv", help="also write the table as CSV to this file")
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not Path(r).exists() and r.endswith(".zip")]
    if missing:
        print(f"error: no such offline session: {', '.join(missing)}", file=sys.stderr)
        return 2
    if any(not Path(r).exists() for r in args.runs):  # task ids / names: the server must answer first
        reason = server_unavailable_reason()
        if reason:
            print(f"error: {reason}", file=sys.stderr)
            return 2
    try:
        rows = comparison_rows([load_run(r) for r in args.runs], args.all)
    except ClearMLTimeout as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(to_text(rows))
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(rows) + "\n")
    if args.csv:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows)
        Path(args.csv).write_text(buffer.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
