"""Every bad input through the real CLI: one line on stderr naming the file or tensor, exit code 2,
SRC byte-identical afterwards, and nothing at DST that a reader would take for a finished checkpoint.

Bad inputs are made by copying a tiny real checkpoint (Qwen3.5-MoE layout: two shards and an index)
and corrupting the copy. The CLI runs as a subprocess (`python -m qstream`), except where a fault
must be injected into the process (ENOSPC without a small filesystem).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qstream.cli import cli
from qstream.errors import QstreamError
from qstream.io.checkpoint import CONFIG_NAME, INDEX_NAME, open_checkpoint

FUSED = "model.language_model.layers.1.mlp.experts.gate_up_proj"  # selected by the default preset
NORM_A, NORM_B = (f"model.language_model.layers.{i}.input_layernorm.weight" for i in (0, 1))


# ------------------------------------------------------------------------------------------------ helpers


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative path -> digest); {} if root does not exist."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def looks_complete(path: Path) -> bool:
    """Would a reader (qstream, or anything honouring the unfinished marker) accept this directory?"""
    try:
        open_checkpoint(path)
    except QstreamError:
        return False
    return True


def shard_of(ckpt: Path, name: str) -> Path:
    return ckpt / json.loads((ckpt / INDEX_NAME).read_text())["weight_map"][name]


def rewrite_header(path: Path, fn: Callable[[dict], None]) -> None:
    """Parse a shard's JSON header, let fn change it, write it back before the unchanged data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    fn(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def poke(ckpt: Path, name: str, index: int, value: float) -> None:
    """Set one element of a tensor on disk (flat index) to value, in the tensor's dtype."""
    st = open_checkpoint(ckpt).tensors[name]
    raw = torch.tensor([value], dtype=st.info.torch_dtype).view(torch.uint8).numpy().tobytes()
    with open(st.file, "r+b") as f:
        f.seek(st.info.start + index * len(raw))
        f.write(raw)


# ------------------------------------------------------------------------------------- the bad inputs


def no_config(src: Path) -> str:
    (src / CONFIG_NAME).unlink()
    return str(src / CONFIG_NAME)


def missing_shard(src: Path) -> str:
    shard = shard_of(src, FUSED)
    shard.unlink()
    return shard.name


def truncated_shard(src: Path) -> str:
    shard = shard_of(src, FUSED)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    return str(shard)


def header_bad_json(src: Path) -> str:
    shard = shard_of(src, FUSED)
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b'{"oops": [1, 2,, ')
    return str(shard)


def header_offsets_past_end(src: Path) -> str:
    shard = shard_of(src, FUSED)
    size = shard.stat().st_size
    rewrite_header(shard, lambda h: h[NORM_B].update(data_offsets=[o + size for o in h[NORM_B]["data_offsets"]]))
    return NORM_B


def header_overlapping(src: Path) -> str:
    shard = shard_of(src, NORM_A)
    assert shard == shard_of(src, NORM_B)
    rewrite_header(shard, lambda h: h[NORM_B].update(data_offsets=h[NORM_A]["data_offsets"]))
    return "overlap"


def unsupported_dtype(src: Path) -> str:
    def fn(h: dict) -> None:  # C64 is a safetensors dtype qstream does not read; same byte count
        h[NORM_B].update(dtype="C64", shape=[h[NORM_B]["shape"][0] // 4])
    rewrite_header(shard_of(src, NORM_B), fn)
    return NORM_B


def nan_in_selected(src: Path) -> str:
    poke(src, FUSED, 1234, float("nan"))
    return FUSED


def inf_in_selected(src: Path) -> str:
    poke(src, FUSED, 77, float("-inf"))
    return FUSED


def already_quantized(src: Path) -> str:
    """The source is itself a qstream output."""
    out = src.parent / "first-pass"
    res = CliRunner().invoke(cli, ["quantize", str(src), str(out), "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    shutil.rmtree(src)
    os.replace(out, src)
    return "already quantized"


# case -> (break the source copy and return the text the error must name, extra CLI args)
BAD_SOURCES: dict[str, tuple[Callable[[Path], str], list[str]]] = {
    "no config.json": (no_config, []),
    "index names a missing shard": (missing_shard, []),
    "truncated shard": (truncated_shard, []),
    "header not JSON": (header_bad_json, []),
    "header offsets past the end": (header_offsets_past_end, []),
    "header ranges overlap": (header_overlapping, []),
    "unsupported dtype": (unsupported_dtype, []),
    "NaN in a selected tensor": (nan_in_selected, []),
    "Inf in a selected tensor": (inf_in_selected, []),
    "already quantized": (already_quantized, []),
}


@pytest.fixture
def src(tiny_qwen35: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny Qwen3.5-MoE checkpoint, to corrupt."""
    return Path(shutil.copytree(tiny_qwen35, tmp_path / "src"))


def qstream(*args: object) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QSTREAM_DEBUG"}
    return subprocess.run([sys.executable, "-m", "qstream", *map(str, args)], capture_output=True, text=True, env=env)


def assert_refused(res, names: str, src: Path, before: dict[str, str], dst: Path,
                   dst_before: dict[str, str] | None = None) -> str:
    """The contract of every bad input; returns the one-line message.

    `res` is a finished subprocess or a click Result. A kept unfinished output (for --resume) is
    fine; anything that a reader would accept as finished is not.
    """
    code = res.returncode if isinstance(res, subprocess.CompletedProcess) else res.exit_code
    assert code == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qstream: error: "), res.stderr
    assert names in lines[0], lines[0]
    assert tree_hashes(src) == before, "SRC changed"
    if dst_before is None:
        assert not dst.exists(), f"{dst} was created"
    else:
        assert tree_hashes(dst) == dst_before, "the existing DST changed"
    for entry in dst.parent.iterdir():
        if entry not in (src, dst) and entry.is_dir():
            assert not looks_complete(entry), f"{entry} looks like a finished checkpoint"
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source(case: str, src: Path, tmp_path: Path) -> None:
    corrupt, args = BAD_SOURCES[case]
    names = corrupt(src)
    before = tree_hashes(src)
    dst = tmp_path / "dst"
    assert_refused(qstream("quantize", src, dst, "--no-progress", *args), names, src, before, dst)


def test_indivisible_input_dim(tiny_llama_indivisible: Path, tmp_path: Path) -> None:
    src = Path(shutil.copytree(tiny_llama_indivisible, tmp_path / "src"))
    before = tree_hashes(src)
    dst = tmp_path / "dst"
    msg = assert_refused(qstream("quantize", src, dst, "--preset", "mlp"), "model.layers.0.mlp.down_proj.weight",
                         src, before, dst)
    assert "--skip-indivisible" in msg
    ok = qstream("quantize", src, dst, "--preset", "mlp", "--skip-indivisible", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    check = qstream("verify", dst, "--source", src)  # kept in BF16 and covered by the ignore list
    assert check.returncode == 0, check.stdout
    assert "model.layers.0.mlp.down_proj.weight" in open_checkpoint(dst).tensors


@pytest.mark.parametrize("where", ["same", "inside"])
def test_dst_is_or_inside_src(where: str, src: Path) -> None:
    before = tree_hashes(src)
    dst = src if where == "same" else src / "out"
    res = qstream("quantize", src, dst, "--no-progress")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and str(dst) in res.stderr
    assert tree_hashes(src) == before


def test_dst_exists(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me\n")
    before, dst_before = tree_hashes(src), tree_hashes(dst)
    msg = assert_refused(qstream("quantize", src, dst), str(dst), src, before, dst, dst_before)
    assert "--overwrite" in msg
    # with --overwrite, a run that fails half way leaves the old DST as it was
    nan_in_selected(src)
    before = tree_hashes(src)
    assert_refused(qstream("quantize", src, dst, "--overwrite", "--no-progress"), FUSED, src, before, dst, dst_before)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["", "--overwrite"])
@pytest.mark.parametrize("command", ["quantize", "dequantize"])
def test_dst_is_a_file(command: str, overwrite: list[str], src: Path, tmp_path: Path) -> None:
    if command == "dequantize":
        res = CliRunner().invoke(cli, ["quantize", str(src), str(tmp_path / "q"), "--no-progress"])
        assert res.exit_code == 0, res.output
        src = tmp_path / "q"
    dst = tmp_path / "notes.txt"
    dst.write_text("not a checkpoint\n")
    before, entries = tree_hashes(src), sorted(tmp_path.iterdir())
    res = qstream(command, src, dst, "--no-progress", *overwrite)
    assert res.returncode == 2 and res.stderr == (f"qstream: error: {dst}: is a file, not a checkpoint directory; "
                                                  "choose another output directory (--overwrite replaces directories "
                                                  "only)\n")
    assert dst.read_text() == "not a checkpoint\n" and tree_hashes(src) == before
    assert sorted(tmp_path.iterdir()) == entries  # no hidden partial or `.notes.txt.qstream-old` beside it


@pytest.mark.parametrize("what", ["does not exist", "not a directory"])
def test_src_not_a_checkpoint_directory(what: str, tmp_path: Path) -> None:
    src = tmp_path / "M"
    if what == "not a directory":
        src.write_text("a file\n")
    res = qstream("quantize", src, tmp_path / "out")
    assert res.returncode == 2 and res.stderr == f"qstream: error: {src}: {what}; give a local checkpoint directory\n"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- full and read-only disks


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount tmpfs file systems under tmp_path (needs CAP_SYS_ADMIN; skips without it)."""
    mounted: list[Path] = []

    def mount(name: str, *opts: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(point)],
                             capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.strip() or res.returncode})")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], check=True)


def test_disk_full_on_a_small_filesystem(src: Path, small_fs) -> None:
    before = tree_hashes(src)
    disk = small_fs("disk", "size=400k")  # the output is ~1.2 MB
    dst = disk / "dst"
    msg = assert_refused(qstream("quantize", src, dst, "--no-progress"), "disk full", src, before, dst)
    assert str(disk) in msg and "free space" in msg


def test_disk_full_injected(src: Path, tmp_path: Path, monkeypatch) -> None:
    """ENOSPC after 300 kB, raised by every call that writes file data (as a full disk would)."""
    budget = [300_000]

    def limited(real, size_of):
        def write(fd, *args):
            n = size_of(args)
            if budget[0] < n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            budget[0] -= n
            return real(fd, *args)
        return write

    monkeypatch.setattr(os, "pwrite", limited(os.pwrite, lambda a: len(a[0])))  # (data, offset)
    monkeypatch.setattr(os, "copy_file_range", limited(os.copy_file_range, lambda a: a[1]))  # (dst, count, ...)
    before = tree_hashes(src)
    dst = tmp_path / "dst"
    res = CliRunner().invoke(cli, ["quantize", str(src), str(dst), "--no-progress"])
    assert budget[0] < 300_000, f"the fault was never reached: {res.exception!r}"
    assert_refused(res, "disk full", src, before, dst)


def test_read_only_destination(src: Path, small_fs) -> None:
    before = tree_hashes(src)
    ro = small_fs("ro", "ro", "size=1m")
    dst = ro / "dst"
    msg = assert_refused(qstream("quantize", src, dst, "--no-progress"), str(ro), src, before, dst)
    assert "not writable" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 555; the tmpfs test covers it there")
def test_read_only_destination_by_mode(src: Path, tmp_path: Path) -> None:
    before = tree_hashes(src)
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert_refused(qstream("quantize", src, parent / "dst", "--no-progress"), str(parent), src, before,
                       parent / "dst")
    finally:
        parent.chmod(0o755)
