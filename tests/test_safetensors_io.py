"""qstream.io.safetensors_io: headers validated against the file, row-range reads (in parts), the byte search of the
scale check, the streaming shard writer."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qstream.errors import QstreamError
from qstream.io.safetensors_io import (MIN_PART, OutEntry, ShardWriter, count_byte, pread_parts, read_header,
                                       read_rows)
from qstream.io.shards import shard_file, write_index


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 64, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(5, 3, generator=g).to(torch.float8_e4m3fn),
        "c.scale": torch.randint(0, 255, (7, 2), generator=g, dtype=torch.uint8),
        "d.bias": torch.randn(11, generator=g),
        "e.scalar": torch.tensor(3.5),
    }


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_a_piece_read_in_parts_is_the_file(tmp_path: Path, parts: int) -> None:
    data = os.urandom(3 * MIN_PART + 12345)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        for offset, n in [(0, len(data)), (777, 3 * MIN_PART + 11), (5, MIN_PART - 1), (MIN_PART, 2 * MIN_PART)]:
            buf = bytearray(n)
            assert pread_parts(fd, memoryview(buf), offset, parts)
            assert bytes(buf) == data[offset:offset + n], (offset, n)
        # the file ends inside the last part, or before the first: never a silent partial read
        assert not pread_parts(fd, memoryview(bytearray(3 * MIN_PART)), len(data) - 3 * MIN_PART + 1, parts)
        assert not pread_parts(fd, memoryview(bytearray(3 * MIN_PART)), len(data), parts)
    finally:
        os.close(fd)


def test_rows_of_a_tensor_read_in_parts(tmp_path: Path) -> None:
    big = torch.randn(1500, 1024, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)  # 3 MiB: 3 parts
    save_file({"big": big}, tmp_path / "x.safetensors")
    info = read_header(tmp_path / "x.safetensors").tensors["big"]
    for r0, r1 in [(0, 1500), (7, 1300), (1000, 1001)]:
        assert torch.equal(read_rows(tmp_path / "x.safetensors", info, r0, r1), big[r0:r1]), (r0, r1)


@pytest.mark.parametrize("piece", [1, 3, 5, 14, 1 << 20])
def test_count_byte_counts_and_finds_the_first(tmp_path: Path, piece: int) -> None:
    scale = torch.zeros(7, 2, dtype=torch.uint8)
    scale[3, 1] = scale[5, 0] = scale[6, 1] = 255
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.full((9,), 255, dtype=torch.uint8), "s": scale, "z": torch.full((4,), 255, dtype=torch.uint8)},
              path)
    info = read_header(path).tensors["s"]
    assert count_byte(path, info, 255, piece) == (3, 3 * 2 + 1)  # not the 255s of the tensors around it
    assert count_byte(path, info, 7, piece) == (0, -1)
    with open(path, "r+b") as f:
        f.truncate(info.end - 1)
    with pytest.raises(QstreamError, match="'s' ends early"):
        count_byte(path, info, 255, piece)


def test_header_and_rows_match_safetensors(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"} and set(header.tensors) == set(tensors)
    for name, t in tensors.items():
        info = header.tensors[name]
        assert (info.torch_dtype, info.shape, info.nbytes) == (t.dtype, tuple(t.shape), t.numel() * t.element_size())
        rows, cols = info.row_shape
        whole = t.reshape(rows, cols)
        assert torch.equal(read_rows(path, info, 0, rows).view(t.dtype), whole)
        if rows > 2:  # a range from the middle
            assert torch.equal(read_rows(path, info, 1, rows - 1), whole[1 : rows - 1])


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))  # same length: the data offsets stay valid
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n :])


def test_bad_headers_name_the_file_and_the_fix(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "x.safetensors"
    save_file(tensors, path)
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(QstreamError, match=r"x\.safetensors: .*past the end of the file.*re-download"):
        read_header(path)
    save_file(tensors, path)
    _rewrite_header(path, lambda h: h["a.weight"].update(dtype="Q4"))
    with pytest.raises(QstreamError, match=r"'a\.weight' has dtype Q4, which qstream does not read \(supported: BF16"):
        read_header(path)
    save_file(tensors, path)
    def overlap(h: dict) -> None:  # c.scale's 14 bytes moved onto a.weight's first ones
        a0 = h["a.weight"]["data_offsets"][0]
        h["c.scale"]["data_offsets"] = [a0, a0 + 14]

    _rewrite_header(path, overlap)
    with pytest.raises(QstreamError, match=r"tensors '(a\.weight|c\.scale)' and '(a\.weight|c\.scale)' overlap"):
        read_header(path)


def _entries(tensors: dict[str, torch.Tensor]) -> list[OutEntry]:
    names = {torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8", torch.float32: "F32"}
    return [OutEntry(n, names[t.dtype], tuple(t.shape)) for n, t in tensors.items()]


def test_writer_streams_pieces_in_any_order(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Written row by row, last tensor first: safetensors reads back exactly the tensors."""
    path = tmp_path / "out.safetensors"
    entries = _entries(tensors)
    with ShardWriter(path, entries, metadata={"format": "pt"}) as writer:
        for e in reversed(entries):
            t = tensors[e.name].reshape(-1, e.shape[-1] if e.shape else 1)
            for r in reversed(range(t.shape[0])):
                writer.write(e.name, t[r], r * e.row_nbytes)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name).reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_writer_copies_a_source_tensor_byte_for_byte(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    info = read_header(src).tensors["a.weight"]
    out = tmp_path / "out.safetensors"
    with ShardWriter(out, [OutEntry("renamed", info.dtype, info.shape)]) as writer:
        writer.copy_from("renamed", src, info)
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("renamed"), tensors["a.weight"])


def test_writer_refuses_short_and_overrunning_tensors(tmp_path: Path) -> None:
    entries = [OutEntry("x", "U8", (4, 8)), OutEntry("y", "U8", (2,))]
    with pytest.raises(ValueError, match="overruns"):
        with ShardWriter(tmp_path / "a.safetensors", entries) as writer:
            writer.write("y", bytes(3))
    with pytest.raises(RuntimeError, match=r"not fully written: \['y'\]"):  # leaving the block commits: y is short
        with ShardWriter(tmp_path / "b.safetensors", entries) as writer:
            writer.write("x", bytes(32))
            writer.write("y", bytes(1))


def test_writer_aborts_on_error_without_committing(tmp_path: Path) -> None:
    """An error in the block closes the file and propagates; the completeness check does not run over it."""
    entries = [OutEntry("x", "U8", (4, 8))]
    with pytest.raises(KeyError):
        with ShardWriter(tmp_path / "a.safetensors", entries) as writer:
            writer.write("x", bytes(8))
            raise KeyError("boom")
    assert writer._fd == -1


def test_shard_file_appears_only_when_complete(tmp_path: Path) -> None:
    entries = [OutEntry("x", "U8", (2, 4))]
    with pytest.raises(ZeroDivisionError):
        with shard_file(tmp_path, "s.safetensors", entries) as writer:
            writer.write("x", bytes(4))
            assert (tmp_path / "s.safetensors.partial").exists()
            1 / 0
    assert not (tmp_path / "s.safetensors").exists()
    with shard_file(tmp_path, "s.safetensors", entries) as writer:
        writer.write("x", bytes(range(8)))
    assert read_header(tmp_path / "s.safetensors").metadata == {"format": "pt"}
    write_index(tmp_path, [("s.safetensors", entries), ("t.safetensors", [OutEntry("y", "BF16", (3,))])])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 8 + 6}, "weight_map": {"x": "s.safetensors", "y": "t.safetensors"}}
