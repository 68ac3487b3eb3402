"""What the bench scripts share: the repository on sys.path, and commands timed as child processes.

The scripts run as `python bench/X.py`, outside the package, so Python puts bench/ on sys.path but not the
repository root; importing this module first adds it (qstream without an install, the tests' fixtures). A
command is timed in a child process so that its wall time includes process start and imports, and its peak
memory is its own.
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qstream.common import REPORT_NAME  # noqa: E402


def _memory(pid: int) -> tuple[int, int]:
    """(VmHWM, RssAnon) of a live process, in bytes; zeros once it is gone. VmHWM counts mapped file pages too
    (the checkpoint's, the shared libraries'), which the kernel can drop; RssAnon is what only this process holds."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if line.startswith(("VmHWM:", "RssAnon:")))
    except OSError:
        return 0, 0
    return tuple(int(fields.get(k, "0 kB").split()[0]) * 1024 for k in ("VmHWM", "RssAnon"))  # type: ignore[return-value]


@dataclass(frozen=True)
class Child:
    """A finished child process: wall seconds, peak RSS (VmHWM) and peak anonymous RSS (polled every 50 ms),
    exit code (None: cut off at its timeout)."""

    wall: float
    peak_rss: int
    peak_anon: int
    rc: int | None


def run_child(cmd: list[str], log: Path, timeout: float | None = None) -> Child:
    """One child process, its output to `log`; the child imports this checkout's qstream.

    getrusage's ru_maxrss of a child also counts this (large) Python process, which the child
    shares between fork and exec; VmHWM belongs to the program after exec, so it is polled instead.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    peak = anon = 0
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            hwm, rss_anon = _memory(proc.pid)
            peak, anon = max(peak, hwm), max(anon, rss_anon)
            if timeout is not None and time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                return Child(time.perf_counter() - t0, peak, anon, None)
            time.sleep(0.05)
    return Child(time.perf_counter() - t0, peak, anon, proc.returncode)


@dataclass(frozen=True)
class Reported:
    """A child process that writes a qstream report: its wall seconds and peak RSS, and the report it wrote
    (None, with a note naming its log, when it failed)."""

    wall: float
    peak_rss: int
    peak_anon: int
    report: dict | None
    note: str = ""


def run_reported(cmd: list[str], out: Path, log: Path) -> Reported:
    """Run `cmd`, which writes `out` with its qstream_report.json (a qstream command, or a script calling it)."""
    c = run_child(cmd, log)
    if c.rc:
        return Reported(c.wall, c.peak_rss, c.peak_anon, None, f"FAILED rc={c.rc}, see {log}")
    return Reported(c.wall, c.peak_rss, c.peak_anon, json.loads((out / REPORT_NAME).read_text()))


def qstream_cmd(*args: str) -> list[str]:
    """`python -m qstream ARGS` with this interpreter."""
    return [sys.executable, "-m", "qstream", *args]


def same_outputs(a: Path, b: Path, skip: tuple[str, ...] = (REPORT_NAME,)) -> bool:
    """Every output file but `skip` byte-identical. The report never is (times, device, scale-out); the card
    only between outputs at like places (`X/q` and `Y/q`): it names the output and its path from the source."""
    names = sorted(p.name for p in a.iterdir() if p.name not in skip)
    return names == sorted(p.name for p in b.iterdir() if p.name not in skip) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def evict(ckpt: Path) -> None:
    """Drop the checkpoint's pages from the page cache (no root needed), for cold-read rows."""
    for p in ckpt.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
