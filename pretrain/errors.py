"""The one exception type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input the user can fix: the CLI prints `error: <message>` and exits non-zero."""
