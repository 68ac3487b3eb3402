"""Errors qstream raises on purpose, so the CLI can print them as one line instead of a traceback."""

from __future__ import annotations

from pathlib import Path


class QstreamError(Exception):
    """A user-facing failure with a one-line message that says what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after an output was started: `kept` is the unfinished output left in place to resume.

    A KeyboardInterrupt still, so callers that stop on Ctrl-C stop; the CLI names the directory.
    """

    def __init__(self, kept: Path) -> None:
        super().__init__(str(kept))
        self.kept = kept
