"""Reading a checkpoint's weight files into the page cache from the moment a command starts.

A conversion spends its first seconds importing torch and starting the device, with the disk idle (2-6 s on
the lent H200, where torch's import alone took 4.5-6.2 s). A process started before those imports reads the
source's weight files in the order the conversion reads them (file by file, front to back: a plan's order), so
on a cold cache the conversion finds its first gigabytes read. A process, not a thread: an import holds the
interpreter's lock for long stretches (loading libraries, compiling bytecode), and a reading thread starved by
it was measured to read nothing useful on the H200. It reads at most half the memory the kernel reports
available, so what it reads is not pushed out again before the conversion gets there, and it skips what is
cached already: a read of one page with RWF_NOWAIT (which fails rather than wait for the disk) at each end of a
piece says whether the piece is in memory, so on a warm cache it costs a few system calls per 16 MiB, not a copy
of the checkpoint. It ends with the command (killed at exit, or by the kernel when the command dies). Standard
library only: it starts before torch is imported.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CHUNK = 16 << 20  # bytes per read
PAGE = 4096
SHARE_OF_AVAILABLE = 0.5  # of MemAvailable: the most it reads
MIN_BYTES = 256 << 20  # smaller checkpoints are read before a process would have started
PR_SET_PDEATHSIG = 1
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux 4.14+; without it every piece is read


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where there is none (not Linux)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _cached(fd: int, offset: int, probe: bytearray) -> bool:
    """Whether the page at `offset` is in the page cache (a read that may not wait for the disk succeeded)."""
    if not _NOWAIT:
        return False
    try:
        return os.preadv(fd, [probe], offset, _NOWAIT) > 0
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP and friends: cannot tell, so read it
        return False


def read_span(fd: int, begin: int, end: int, view: memoryview) -> int:
    """Read bytes [begin, end) of fd through `view`, a piece at a time, only for the page cache (the engine's
    look-ahead too); returns the bytes read (fewer where the file ends first)."""
    done = 0
    while begin + done < end:
        k = os.preadv(fd, [view[:min(len(view), end - begin - done)]], begin + done)
        if k <= 0:
            break
        done += k
    return done


def read_ahead(files: Sequence[Path], budget: int) -> int:
    """Read `files` front to back into the page cache, skipping pieces cached already, until `budget` bytes of
    them have been passed; returns the bytes it read from the files (the rest was cached)."""
    buf, probe = bytearray(CHUNK), bytearray(PAGE)
    view = memoryview(buf)
    read = passed = 0
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # the command names the file in its own error
        try:
            size = os.fstat(fd).st_size
            for offset in range(0, size, CHUNK):
                if passed >= budget:
                    return read
                n = min(CHUNK, size - offset)
                passed += n
                if _cached(fd, offset, probe) and _cached(fd, offset + n - min(n, PAGE), probe):
                    continue
                read += read_span(fd, offset, offset + n, view)
        finally:
            os.close(fd)
    return read


_running: list[subprocess.Popen] = []


@atexit.register
def _stop() -> None:
    for proc in _running:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start(root: Path) -> subprocess.Popen | None:
    """Start reading the weight files of the checkpoint at `root` in a process of its own, within
    SHARE_OF_AVAILABLE of the available memory; None where there is nothing worth reading ahead."""
    try:
        files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
        size = sum(f.stat().st_size for f in files)
    except OSError:
        return None  # the command names the path in its own error
    available = available_memory()
    budget = int(available * SHARE_OF_AVAILABLE) if available is not None else 0
    if budget <= 0 or size < MIN_BYTES:
        return None
    proc = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid()), str(budget), *map(str, files)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _running.append(proc)
    return proc


def main(argv: Sequence[str]) -> None:
    """The reading process: PARENT_PID BUDGET FILE...; it dies with its parent (Linux), or does not start."""
    parent, budget, *files = argv
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):  # the parent died before the line above
        return
    read_ahead([Path(f) for f in files], int(budget))


if __name__ == "__main__":
    main(sys.argv[1:])
