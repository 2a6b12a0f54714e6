"""`python -m vocseg clearml-import SESSION.zip`: upload an offline ClearML session to the configured server."""

from __future__ import annotations

import sys
from pathlib import Path
from vocseg.errors import OneLineArgumentParser


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m vocseg clearml-import", description=__doc__.split("\n")[0])
    parser.add_argument("session", help="offline session zip (or folder) printed at the end of an offline run")
    args = parser.parse_args(argv)
    session = Path(args.session)
    if not session.exists():
        print(f"error: {session} does not exist", file=sys.stderr)
        return 2
    from vocseg.tracking import configured_api_host, unreachable_reason

    host = configured_api_host()
    if host is None:
        print("error: no ClearML server configured: run clearml-init (or set CLEARML_API_HOST and "
              "CLEARML_API_ACCESS_KEY / CLEARML_API_SECRET_KEY) first", file=sys.stderr)
        return 2
    reason = unreachable_reason(host)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    from clearml import Task

    task_id = Task.import_offline_session(str(session))
    if not task_id:
        print(f"error: ClearML did not import {session}", file=sys.stderr)
        return 1
    print(f"imported {session} as ClearML task {task_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
