"""Names that several rooms need, kept at the bottom so no room imports a higher one for them.

Output file names and their readers (the quantize report, stored eval results), where qstream caches
things, the device a command runs on, a clock for reports' stages, and plain text tables. Nothing here knows
about tensors' formats.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from qstream.errors import QstreamError

if TYPE_CHECKING:
    import torch

REPORT_NAME = "qstream_report.json"  # what `quantize` measured: per tensor and totals (with times and memory)
EVAL_NAME = "qstream_eval.json"  # what `eval --card DST` measured on DST
EVAL_SCHEMA = "qstream-eval/1"
CARD_NAME = "README.md"  # the model card
# A source card's section that says where its weights came from (e.g. dequantized from a 4-bit GGUF): it holds
# for every checkpoint made from them, so cards carry it over verbatim (and assets' built cards write one).
PROVENANCE = "## Provenance"


T = TypeVar("T")


@dataclass
class Clock:
    """Where a run's time goes, seconds per stage, for its report: the first thing to read when a run is slower
    than the disk. quantize's thread times blocks (`stage`, `timed`: waiting for reads, the kernel, waiting for
    writes, syncing; its `totals.stages`); calibrate closes phases in turn (`lap`: the time since the last lap,
    or since the clock started)."""

    seconds: dict[str, float] = field(default_factory=dict)
    last: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    def timed(self, items: Iterator[T], name: str) -> Iterator[T]:
        """`items`, the time spent waiting for each added to stage `name`; closing this closes them."""
        try:
            while True:
                with self.stage(name):
                    try:
                        item = next(items)
                    except StopIteration:
                        return
                yield item
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()


def read_report(dst: Path) -> dict:
    """DST/qstream_report.json as `quantize` wrote it (OSError or ValueError if absent or unreadable)."""
    return json.loads((Path(dst) / REPORT_NAME).read_text())


def read_saved(dst: Path) -> dict | None:
    """DST/qstream_eval.json as `eval --card` saved it, or None when DST holds no eval results."""
    path = Path(dst) / EVAL_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QstreamError(f"{path}: unreadable ({exc}); re-run `qstream eval SOURCE {dst} --card {dst}`") from None
    if not isinstance(data, dict) or data.get("schema") != EVAL_SCHEMA:
        raise QstreamError(f"{path}: not a {EVAL_SCHEMA} file; re-run `qstream eval SOURCE {dst} --card {dst}`")
    return data


CHUNK_ELEMENTS = 8 * 1024 * 1024  # weight elements a streaming command (quantize, dequantize) holds at once


def row_chunks(rows: int, cols: int, max_elements: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """[r0, r1) ranges covering rows start..rows-1 of a [rows, cols] tensor, at most max_elements each (but at
    least one row): how every streaming loop bounds its memory."""
    step = max(1, max_elements // max(1, cols))
    for r0 in range(start, rows, step):
        yield r0, min(r0 + step, rows)


def cache_dir() -> Path:
    """Where wheels, extracted files and built kernels live: `$QSTREAM_CACHE`, else `~/.cache/qstream`."""
    env = os.environ.get("QSTREAM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qstream"


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA when torch sees it, else CPU; asking for CUDA without one is the user's error."""
    import torch  # here, not at the top: the rest of this module serves light callers (the CLI's tables)

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise QstreamError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def table(header: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table (markdown-compatible)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def peak_rss_bytes() -> int:
    """This program's peak resident memory: VmHWM where /proc has it. Linux's ru_maxrss also keeps the peak of
    the process that started us (exec carries it over from the fork), so a command run by a large process, a
    benchmark's or a test's, would report that process's size instead of its own."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
