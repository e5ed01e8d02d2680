"""User-facing errors."""


class RaypathError(Exception):
    """A user-facing error: its message names the input and the remedy.

    The CLI prints it without a traceback and exits with status 2.
    """
