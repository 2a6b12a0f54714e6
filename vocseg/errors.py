"""The errors a user can act on, and the exit codes the command-line tools end with.

A `VocsegError` is a known failure with a one-line message that names the file, key or step and says what
to do; the CLIs print that line (no traceback unless --debug) and exit with its code. Anything else is a bug
and keeps its traceback.

Exit codes (documented in the README, relied on by schedulers):
    0  finished
    1  failed (diverged, evaluation failed, disk full, ...; the message says why)
    2  usage error: a bad flag, recipe, path or data set
    3  stopped by a signal (SIGTERM / SIGINT) after saving a checkpoint: resume it
  130  aborted by a second Ctrl-C (no checkpoint written for the current step)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_ABORTED = 0, 1, 2, 3, 130


class VocsegError(Exception):
    """A known failure: its message is one line a user can act on."""
    exit_code = EXIT_FAILED


class UsageError(VocsegError, ValueError):
    """The user asked for something that cannot work (flag, recipe, path, folder already in use, ...)."""
    exit_code = EXIT_USAGE


class TrainingDiverged(VocsegError):
    """Non-finite loss or gradient norm: the run stops before any checkpoint or export is written from it."""


class DiskFull(VocsegError, OSError):
    """Not enough space for a checkpoint or an export."""


class EvaluationFailed(VocsegError):
    """An evaluation could not run (e.g. out of memory on a huge image); training state is already saved."""


def on_main_then_everywhere(state, work, *args):
    """Run `work` on the main process and broadcast its result; a known error is raised on every rank.

    Without this, a main process that refuses (folder in use, bad value from the server, ...) would leave
    the other ranks waiting in the next collective until the NCCL timeout.
    """
    payload = [None, None]
    if state.is_main_process:
        try:
            payload = [work(*args), None]
        except VocsegError as error:
            payload = [None, (type(error), str(error))]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(payload)
    if payload[1] is not None:
        error_type, message = payload[1]
        raise error_type(message)
    return payload[0]


# Raised by libraries or the data layer with messages that already name the file: a user error, not a bug.
_USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError)


def exit_code_of(error: BaseException) -> int | None:
    """The exit code for a known error, None for a bug (which keeps its traceback)."""
    from vocseg.data.sources import DataError  # the data layer's own user error (a ValueError)

    if isinstance(error, VocsegError):
        return error.exit_code
    if isinstance(error, (DataError, *_USER_ERRORS)):
        return EXIT_USAGE
    return None


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def cli_errors(debug: bool = False):
    """Turn known errors into one line on stderr and their exit code; --debug keeps the traceback."""
    try:
        yield
    except KeyboardInterrupt:
        if is_main_rank():
            print("aborted (second Ctrl-C): the current step was not saved; resume from the last checkpoint",
                  file=sys.stderr, flush=True)
        raise SystemExit(EXIT_ABORTED) from None
    except Exception as error:  # noqa: BLE001 - sorted into known errors and bugs just below
        code = exit_code_of(error)
        if code is None or debug:
            raise
        if is_main_rank():  # every rank raises the same error; one line is enough
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(code) from None


def pop_flag(argv: list[str], flag: str) -> bool:
    """Remove a bare `--flag` from argv (e.g. --debug, which is not a training hyperparameter)."""
    found = flag in argv
    while flag in argv:
        argv.remove(flag)
    return found


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (not the whole usage text) and exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")
