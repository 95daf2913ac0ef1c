"""User-facing errors.

Every problem a user can fix (bad model name, unsupported graph, bad data, ...)
raises :class:`WsvdError` with one line that names the problem and the fix.
The CLI prints that line and exits with status 2; it never shows a traceback.
"""


class WsvdError(Exception):
    """A problem with the user's input, stated in one line with its fix."""
