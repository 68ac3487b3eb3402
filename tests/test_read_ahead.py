"""qstream.io.read_ahead: the source's weight files read front to back within a budget, cached pieces skipped,
the files untouched, and quantize starting it before torch is imported."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qstream.io import read_ahead

CHUNK = 4 * read_ahead.PAGE


def _files(tmp_path: Path, sizes: list[int]) -> list[Path]:
    paths = []
    for i, size in enumerate(sizes):
        p = tmp_path / f"model-{i:05d}.safetensors"
        p.write_bytes(os.urandom(size))
        paths.append(p)
    return paths


def _evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.parametrize("budget,want", [(0, 0), (1, CHUNK), (50_000, 50_000), (10**9, 100_000)])
def test_reads_front_to_back_within_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int,
                                               want: int) -> None:
    """Nothing counts as cached here: the bytes read are the pieces passed until the budget is reached (a piece
    once begun is read whole), file after file in the order given."""
    monkeypatch.setattr(read_ahead, "CHUNK", CHUNK)
    monkeypatch.setattr(read_ahead, "_cached", lambda fd, offset, probe: False)
    files = _files(tmp_path, [40_000, 10_000, 50_000])
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    assert read_ahead.read_ahead(files + [tmp_path / "missing.safetensors"], budget) == want
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in files] == before


def test_cached_pieces_are_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(read_ahead, "CHUNK", CHUNK)
    files = _files(tmp_path, [3 * CHUNK + 100])
    files[0].read_bytes()
    fd = os.open(files[0], os.O_RDONLY)
    try:
        if not read_ahead._cached(fd, 0, bytearray(read_ahead.PAGE)):
            pytest.skip("this file system or kernel cannot tell cached pages (RWF_NOWAIT): every piece is read")
    finally:
        os.close(fd)
    assert read_ahead.read_ahead(files, 10**9) == 0
    _evict(files)
    if read_ahead.read_ahead(files, 10**9) == 0:
        pytest.skip("the page cache kept the file (tmpfs?)")
    assert read_ahead.read_ahead(files, 10**9) == 0  # read once, cached since


def test_start_reads_in_a_process_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _files(tmp_path, [50_000, 20_000])
    assert read_ahead.start(tmp_path) is None  # under MIN_BYTES: not worth a process
    assert read_ahead.start(tmp_path / "missing") is None
    monkeypatch.setattr(read_ahead, "MIN_BYTES", 0)
    proc = read_ahead.start(tmp_path)
    assert proc is not None and proc.wait(timeout=60) == 0
    assert proc.args[-2:] == [str(f) for f in files]
    bad = subprocess.run([sys.executable, "-m", "qstream.io.read_ahead", "1", "100", str(files[0])], timeout=60)
    assert bad.returncode == 0  # a parent that is gone: it returns at once


@pytest.mark.parametrize("command", ["quantize", "verify"])
def test_commands_start_it_before_importing_torch(tiny_qwen35: Path, tmp_path: Path, command: str) -> None:
    """The point of it: the process is reading while torch is imported (quantize: SRC; verify --source: SRC)."""
    if command == "verify":
        done = subprocess.run([sys.executable, "-m", "qstream", "quantize", str(tiny_qwen35), str(tmp_path / "out"),
                               "--no-progress"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    args = (["quantize", str(tiny_qwen35), str(tmp_path / "out"), "--no-progress"] if command == "quantize"
            else ["verify", str(tmp_path / "out"), "--source", str(tiny_qwen35)])
    probe = (
        "import sys, threading\n"
        "import qstream.io.read_ahead as ra\n"
        "real = ra.start\n"
        "def start(root):\n"
        "    print('torch imported at start:', 'torch' in sys.modules, 'root:', root, flush=True)\n"
        "    return real(root)\n"
        "ra.start = start\n"
        "from qstream.cli import main\n"
        "sys.argv = ['qstream', *sys.argv[1:]]\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert f"torch imported at start: False root: {tiny_qwen35}" in out.stdout
