"""`qstream verify`: check a written MXFP4 checkpoint against the format, vLLM's loading rules and, optionally,
its source.

Each check returns a `Check` (what it looked at, and every failure as one line naming the tensor or file).
The cheap checks (verify_structure) read headers, config.json and the scale bytes only, so `quantize` runs
them before publishing; the source checks (verify_source) stream both checkpoints in row chunks, re-quantizing
with the fast kernels held to the torch path on a seeded sample (check.kernel_audit), or with the torch path alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from qstream.check.kernel_audit import DEFAULT_SAMPLING, Sampling
from qstream.check.verify_report import Check, VerifyReport
from qstream.check.verify_source import against_source, recorded_bound
from qstream.check.verify_structure import CHEAP_CHECKS, layout, quantization_config
from qstream.common import resolve_device
from qstream.errors import QstreamError
from qstream.io.checkpoint import open_checkpoint, require_dir


def verify(dst: Path, source: Path | None = None, *, device: str = "cpu", full: bool = False,
           sampling: Sampling = DEFAULT_SAMPLING, unfinished_ok: bool = False,
           parse_with_compressed_tensors: bool = True) -> VerifyReport:
    """Run every check on dst (and against source if given); a bad dst gives failures, not exceptions
    (but a dst that is not a directory at all is a usage error).

    `device` ("cpu", "cuda", "auto") is where the source comparison re-quantizes: with the fast kernels, audited
    on the blocks `sampling` draws, about as costly as quantizing; with `full`, every block through the torch path.
    `parse_with_compressed_tensors` also runs compressed-tensors' own config parser when it is installed
    (importing it costs ~180 MiB, which `quantize` does not spend on its own, fixed, config).
    """
    dst = require_dir(Path(dst))
    src = open_checkpoint(Path(source)) if source is not None else None  # a bad SRC is a usage error
    dev = resolve_device(device)
    shape, out = layout(dst, unfinished_ok)
    report = VerifyReport(dst, Path(source) if source is not None else None, [shape])
    if out is None:
        return report
    for name, fn in CHEAP_CHECKS:
        if fn is quantization_config:
            fn = functools.partial(fn, external=parse_with_compressed_tensors)
        report.checks += _guarded(name, fn, out)
    if src is not None:
        report.checks += _guarded("source tensors", against_source, src, out, recorded_bound(dst), dev,
                                  full, sampling)
    return report


def _guarded(name: str, fn: Callable[..., Check | list[Check]], *args: object) -> list[Check]:
    """Run one check; bytes it cannot read (a shard truncated under it) are its failure, not a crash."""
    try:
        result = fn(*args)
    except QstreamError as exc:
        return [Check(name, "could not be completed", [str(exc)])]
    return result if isinstance(result, list) else [result]


def verify_written(tmp_dir: Path) -> None:
    """The cheap checks on a just-written output (marker still present); raise if any fails.

    A failure here is a qstream bug, not bad input: the output is not published.
    """
    report = verify(tmp_dir, unfinished_ok=True, parse_with_compressed_tensors=False)
    if not report.ok:
        first, n = report.failures[0], len(report.failures)
        raise QstreamError(f"{tmp_dir}: the written output fails verification ({first}"
                           f"{f'; and {n - 1} more' if n > 1 else ''}); this is a qstream bug, please report it")
