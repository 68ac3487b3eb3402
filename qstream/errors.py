"""Errors qstream raises on purpose, so the CLI can print them as one line instead of a traceback."""


class QstreamError(Exception):
    """A user-facing failure with a one-line message that says what to do."""
