"""User-facing errors.

A ``UserError`` is a mistake in the user's input (a path, a config value, a file's
content). Entry points print its message as one line and exit non-zero, with no
traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` says what and how."""

    exit_code = 2


class ConfigError(UserError):
    """One or more invalid config keys or values (all of them in one message)."""


class ModelLoadError(UserError):
    """A model source that cannot be loaded: missing, corrupt or unsupported."""
