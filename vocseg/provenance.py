"""Where the code of a run came from, read locally: git repository, branch, commit, uncommitted diff,
entry point, working directory and installed packages. No network.

ClearML records this itself when online; offline its repository detection is off (it may contact an
update server), so an offline session imported later could be viewed but not cloned and re-run by an
agent. vocseg records the same "script" section from these local reads instead.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

logger = logging.getLogger("vocseg")

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"
MAX_DIFF_CHARS = 500_000  # a diff larger than this is left out (and said so): it would bloat every task


@dataclass(frozen=True)
class ScriptInfo:
    """The fields of a ClearML task's "script" section."""
    repository: str
    branch: str
    commit: str
    diff: str
    working_dir: str
    entry_point: str
    binary: str


def _git(repo: Path, *args: str, strip: bool = True) -> str:
    """The output of a git command ('' when it fails); `strip=False` keeps a diff applicable as is."""
    result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return ""
    return result.stdout.strip() if strip else result.stdout


def entry_script() -> Path:
    """The script this process runs (train.py, or the user's own script that calls vocseg); train.py when the
    process is an installed tool (`python -m pytest`, `python -c`), which an agent could not replay."""
    argv0 = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    installed = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                             sys.prefix, sys.base_prefix)}
    if (argv0 is not None and argv0.suffix == ".py" and argv0.is_file()
            and not any(root == argv0 or root in argv0.parents for root in installed)):
        return argv0
    return TRAIN_SCRIPT


def script_info(script: Path, cwd: Path | None = None) -> ScriptInfo | None:
    """The script section for `script`, or None when it is not inside a git work tree."""
    script = Path(script).resolve()
    if not script.is_file():
        return None
    root = _git(script.parent, "rev-parse", "--show-toplevel")
    if not root:
        return None
    root = Path(root)
    cwd = Path(cwd or os.getcwd()).resolve()
    working = cwd if cwd == root or root in cwd.parents else root  # the agent runs the entry point from here
    # No remote (a local repository): its path, which an agent on this machine can still clone.
    repository = _git(root, "remote", "get-url", "origin") or _git(root, "config", "--get", "remote.origin.url")
    if not repository:
        repository = str(root)
        logger.warning(f"git repository {root} has no remote 'origin': recorded by its path, which only an agent "
                       "on this machine can clone")
    diff = _git(root, "diff", "HEAD", strip=False)
    if len(diff) > MAX_DIFF_CHARS:
        logger.warning(f"uncommitted changes in {root} ({len(diff)} characters of diff) are too large to record: "
                       "commit them, or a replay runs the committed code")
        diff = ""
    return ScriptInfo(repository=repository, branch=_git(root, "rev-parse", "--abbrev-ref", "HEAD"),
                      commit=_git(root, "rev-parse", "HEAD"), diff=diff,
                      working_dir=os.path.relpath(working, root), entry_point=os.path.relpath(script, working),
                      binary=f"python{sys.version_info.major}.{sys.version_info.minor}")


def installed_packages(exclude: tuple[str, ...] = ("vocseg",)) -> list[str]:
    """`name==version` for every installed distribution, like `pip freeze`, sorted.

    Editable installs (the project itself, checked out by the agent from the repository) are left out:
    an agent cannot pip-install them by version.
    """
    packages = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name or name.lower() in exclude or _is_editable(dist):
            continue
        packages[name.lower()] = f"{name}=={dist.version}"
    return [packages[k] for k in sorted(packages)]


def _is_editable(dist) -> bool:
    direct_url = dist.read_text("direct_url.json") or ""
    return '"editable": true' in direct_url.replace("'", '"')
