"""User-facing errors.

A ``UserError`` is a mistake in the user's input (a path, a config value, a file's
content). Entry points print its message as one line and exit non-zero, with no
traceback; anything else is a bug and keeps its traceback.
"""


import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` says what and how."""

    exit_code = 2


class ConfigError(UserError):
    """One or more invalid config keys or values (all of them in one message)."""


class ModelLoadError(UserError):
    """A model source that cannot be loaded: missing, corrupt or unsupported."""


def run_reporting_errors(work: Callable[[], int | None]) -> int:
    """An entry point's exit code for ``work()``: a ``UserError`` becomes ``error: ...`` on
    stderr and its exit code, Ctrl-C exit 130; any other exception keeps its traceback."""
    try:
        return int(work() or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
