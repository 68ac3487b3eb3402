"""Errors qstream raises on purpose, so the CLI can print them as one line instead of a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


class QstreamError(Exception):
    """A user-facing failure with a one-line message that says what to do."""


class CalibrationSizeError(QstreamError):
    """Calibration windows that cannot be had (too few tokens, too small a size). Each command names the window
    count and length by its own flags (`calibrate --samples --seq-len`, `quantize --calib-samples
    --calib-seq-len`), so the message is made from them: calibrate's by default, another's by `worded`."""

    def __init__(self, wording: Callable[[str, str], str]) -> None:
        super().__init__(wording("--samples", "--seq-len"))
        self.wording = wording

    def worded(self, samples_flag: str, seq_len_flag: str) -> QstreamError:
        """The same error in the words of a command whose flags for samples and seq_len are these."""
        return QstreamError(self.wording(samples_flag, seq_len_flag))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after an output was started: `kept` is the unfinished output left in place to resume.

    A KeyboardInterrupt still, so callers that stop on Ctrl-C stop; the CLI names the directory.
    """

    def __init__(self, kept: Path) -> None:
        super().__init__(str(kept))
        self.kept = kept
