"""Is there a ClearML server that answers, and how long may a ClearML call take.

The SDK never gives up on a server: `Task.init`, `Task.get_task` and every other call retry for minutes,
and its request loop (`InterfaceBase._send`) catches every Exception and tries again. A run or a command
must not hang on that. So before any SDK call vocseg asks the API itself (`<api>/debug.ping`, a few
seconds, an HTTP 200 with a JSON body or it counts as down: a server that accepts and never answers, or a
proxy answering 502, is as unreachable as a closed port); and the SDK calls that follow run under
`deadline`, which interrupts them with a signal however deep in the SDK's retry loops they are.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REACHABILITY_TIMEOUT_S = 3.0
DEADLINE_ENV = "VOCSEG_CLEARML_TIMEOUT"
DEFAULT_DEADLINE_S = 30.0
_FALSE = ("", "0", "false", "no", "off")


class ClearMLTimeout(BaseException):
    """A ClearML call ran past its deadline. A BaseException on purpose: the SDK retries every Exception."""


def deadline_seconds() -> float:
    """How long Task.init (and the commands' server calls) may take: $VOCSEG_CLEARML_TIMEOUT, default 30 s."""
    value = os.environ.get(DEADLINE_ENV)
    try:
        seconds = float(value) if value else DEFAULT_DEADLINE_S
    except ValueError:
        raise ValueError(f"{DEADLINE_ENV}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{DEADLINE_ENV}={value!r} must be positive")
    return seconds


@contextmanager
def deadline(seconds: float, what: str):
    """Raise ClearMLTimeout in this block after `seconds`, even inside a blocking socket read or a sleep.

    SIGALRM, so only in the main thread (where train.py and the commands run); elsewhere the block runs
    unbounded, which the reachability check before it makes unlikely to matter.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise ClearMLTimeout(f"{what} did not finish within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:  # someone else's alarm (e.g. a test timeout) keeps running, late at worst
            remaining = max(outer_delay - (time.monotonic() - start), 0.001)
            signal.setitimer(signal.ITIMER_REAL, remaining, outer_interval)


def configured_api_host() -> str | None:
    """The API server from $CLEARML_API_HOST or clearml.conf; None when no server is configured at all."""
    if os.environ.get("CLEARML_API_HOST"):
        return os.environ["CLEARML_API_HOST"]
    config_file = Path(os.environ.get("CLEARML_CONFIG_FILE", Path.home() / "clearml.conf")).expanduser()
    has_credentials = bool(os.environ.get("CLEARML_API_ACCESS_KEY") or os.environ.get("CLEARML_API_SECRET_KEY"))
    if not config_file.is_file() and not has_credentials:
        return None
    from clearml.backend_api import Session

    return Session.get_api_server_host()


def unreachable_reason(url: str, timeout: float = REACHABILITY_TIMEOUT_S) -> str | None:
    """None if the API server answers `debug.ping` with HTTP 200 and JSON within `timeout`; else why not."""
    import requests

    base = (url if "://" in url else f"http://{url}").rstrip("/")
    try:
        response = requests.get(f"{base}/debug.ping", timeout=(timeout, timeout))
    except requests.Timeout:
        return f"ClearML server {url} is unreachable (no answer to debug.ping within {timeout:g} s)"
    except requests.RequestException as error:
        return f"ClearML server {url} is unreachable ({type(error).__name__}: {_first_line(error)})"
    if response.status_code != 200:
        return f"ClearML server {url} is unreachable (debug.ping answered HTTP {response.status_code})"
    try:
        response.json()
    except ValueError:
        return f"ClearML server {url} is unreachable (debug.ping did not answer JSON: not a ClearML API server?)"
    return None


def offline_reason() -> str | None:
    """Why a run cannot talk to a ClearML server (and must record offline), or None when it can."""
    if os.environ.get("CLEARML_OFFLINE_MODE", "").strip().lower() not in _FALSE:
        return "CLEARML_OFFLINE_MODE is set"
    host = configured_api_host()
    if host is None:
        return "no ClearML server configured (no clearml.conf, no CLEARML_API_HOST)"
    return unreachable_reason(host)


def server_unavailable_reason() -> str | None:
    """For commands that need the server (compare by task id, clearml-import, sweep): None when it answers."""
    host = configured_api_host()
    if host is None:
        return ("no ClearML server configured: run clearml-init (or set CLEARML_API_HOST and "
                "CLEARML_API_ACCESS_KEY / CLEARML_API_SECRET_KEY) first")
    return unreachable_reason(host)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "no details"
