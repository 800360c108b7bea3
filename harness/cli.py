"""The one error mechanism of every entry point: bad input is one `error:` line and exit status 2.

    class MyError(UserError): ...              # any module: raise it for input the user can fix

    @hydra.main(...)
    def main(cfg):
        run_cli(lambda: work(cfg), error_log=run_dir / "error.log")

    if __name__ == "__main__":
        exit_after(main)                       # exits with the worst status of all jobs

Why a base class of our own and not ValueError: a ValueError deep in numpy, torch or our own code is
a bug, and it must surface as a traceback (exit 1), not pass for bad input. So only `UserError`, a
few OS errors about paths the user named, and OmegaConf's missing-value error count as bad input.
The traceback of a user error is not lost: it goes to `error_log` (the run folder's error.log) when
the entry point has one, and to the debug log otherwise.

Exit statuses: 0 ok, 2 bad input, 130 interrupted (Ctrl-C), 128 + n killed by signal n (training
writes its checkpoint first), 1 a bug (Python's own traceback). In a Hydra multirun every job
reports through a file named in the environment, which joblib's worker processes inherit, so the
sweep exits with the worst status whichever launcher ran the jobs.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable, NoReturn

log = logging.getLogger("harness")
STATUS_FILE_ENV = "HARNESS_EXIT_STATUS_FILE"
BAD_INPUT, INTERRUPTED = 2, 130


class UserError(Exception):
    """Input the user can fix (a config value, a file, a folder): one `error:` line, exit status 2.
    The message names what is wrong and what to do about it."""


class Interrupted(Exception):
    """Stopped by a signal after cleaning up (a child's checkpoint written, say): one `error:` line
    with the message, exit status 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# OS errors about a path the user gave: the message (strerror + file name) says which.
PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def user_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import MissingMandatoryValue
    return (UserError, MissingMandatoryValue, *PATH_ERRORS)


def message(e: BaseException) -> str:
    """The one-line form of a user error."""
    if type(e).__name__ == "MissingMandatoryValue":
        return f"missing value for {e.full_key}; pass {e.full_key}=..."
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def _is_rank_zero() -> bool:
    """Under torchrun every rank raises the same error; one line is enough."""
    return os.environ.get("RANK", "0") == "0"


def report(status: int) -> int:
    """Record a job's exit status for `exit_after` (a no-op outside it)."""
    path = os.environ.get(STATUS_FILE_ENV)
    if status and path:
        with open(path, "a") as f:
            f.write(f"{status}\n")
    return status


def run_cli(fn: Callable[[], Any], error_log: str | os.PathLike | None = None,
            interrupted: str = "interrupted") -> int:
    """Call fn(); turn bad input into one `error:` line (status 2) and Ctrl-C into one line (130).
    fn may return an exit status (None is 0). Any other exception is a bug and propagates."""
    try:
        status = int(fn() or 0)
    except user_errors() as e:
        detail = traceback.format_exc()
        if error_log is not None:
            with suppress(OSError):
                Path(error_log).write_text(detail)
        log.debug("bad input:\n%s", detail)
        if _is_rank_zero():
            print(f"error: {message(e)}", file=sys.stderr, flush=True)
        status = BAD_INPUT
    except Interrupted as e:
        if _is_rank_zero():
            print(f"error: {message(e)}", file=sys.stderr, flush=True)
        status = 128 + e.signum
    except KeyboardInterrupt:
        if _is_rank_zero():
            print(f"error: {interrupted}", file=sys.stderr, flush=True)
        status = INTERRUPTED
    return report(status)


def exit_after(main: Callable[[], Any], argv_check: Callable[[list[str]], list[str]] | None = None) -> NoReturn:
    """Run a @hydra.main function (one job or a multirun under any launcher), then exit with the
    worst status a job reported. `argv_check` may rewrite sys.argv[1:] first (raising UserError)."""
    if argv_check is not None:
        try:
            sys.argv[1:] = argv_check(sys.argv[1:])
        except UserError as e:
            print(f"error: {message(e)}", file=sys.stderr, flush=True)
            sys.exit(BAD_INPUT)
    from hydra.errors import HydraException

    fd, path = tempfile.mkstemp(prefix="harness-exit-status-")
    os.close(fd)
    os.environ[STATUS_FILE_ENV] = path
    # Hydra then raises a bad override or config group instead of printing several lines and
    # exiting 1; we print it as one line. A bug inside a job still ends in its full traceback.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
        statuses = [int(x) for x in Path(path).read_text().split()]
    except HydraException as e:
        print(f"error: {hydra_message(e)}", file=sys.stderr, flush=True)
        statuses = [BAD_INPUT]
    finally:
        os.unlink(path)
        del os.environ[STATUS_FILE_ENV]
    sys.exit(max(statuses, default=0))


def hydra_message(e: BaseException) -> str:
    """Hydra's multi-line report of a bad override (a misspelt key, broken syntax) as one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = str(e.__cause__).splitlines()[0].strip() if e.__cause__ and str(e.__cause__).strip() else ""
    head = lines[0].rstrip(".") if lines else type(e).__name__
    return " ".join([head + (f": {cause}" if cause else "") + ".", *lines[1:]])


# --- checked config values: one line naming the key instead of a TypeError deep inside -------------

def int_option(value: Any, key: str, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """`value` as an int (a whole number: not a bool, not 2.5, not "abc"), at least `minimum`."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, str) and
                                                                    value.strip().lstrip("+-").isdigit()))
    if ok:
        number = int(value)
        if minimum is None or number >= minimum:
            return number
    bound = "" if minimum is None else {0: " (0 or more)", 1: " (1 or more)"}.get(minimum, f" (at least {minimum})")
    none = " or null" if allow_none else ""
    raise UserError(f"{key}={value!r}: expected a whole number{bound}{none}")


def float_option(value: Any, key: str, minimum: float | None = None, above: float | None = None) -> float:
    """`value` as a finite float, >= minimum and > above when given."""
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value!r}: expected a number") from None
    if number != number or number in (float("inf"), float("-inf")) or \
            (minimum is not None and number < minimum) or (above is not None and number <= above):
        bound = f" >= {minimum}" if minimum is not None else f" > {above}" if above is not None else ""
        raise UserError(f"{key}={value!r}: expected a finite number{bound}")
    return number


def bool_option(value: Any, key: str) -> bool:
    """Hydra parses true/false; anything else ("yes", 1, "abc") is refused rather than truth-tested."""
    if isinstance(value, bool):
        return value
    raise UserError(f"{key}={value!r}: expected true or false")


def choice_option(value: Any, key: str, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        raise UserError(f"{key}={value!r}: expected one of {', '.join(map(str, choices))}")
    return str(value)
