"""User-facing errors.

A `UserError` is a mistake in the input (a path, a config key, a value) that the user can fix. The CLI prints its
message on one line and exits with status 2; library callers catch it like any exception.
"""


class UserError(Exception):
    """An error in the user's input; its message names the problem and the fix."""


class CorruptData(UserError):
    """A file or stream that fails its checks (truncated, a flipped bit, a wrong magic or version); the message
    names what is wrong and where."""
