"""qstream.io.device_reader: reads through reused staging buffers give the stored bytes; the buffers are refilled
only after the copy that last read them (the CUDA path's ordering, seen here through its events)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from qstream.convert.pipeline import _read_items
from qstream.engine.weights import read_stored
from qstream.errors import QstreamError
from qstream.format.rules import Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.io.device_reader import DeviceReader, Staging
from qstream.planning.plan import CopyJob, make_plan
from qstream.planning.selection import Selection

CPU = torch.device("cpu")


@pytest.mark.parametrize("buffers", [1, 2, 3])
def test_whole_tensors_and_row_ranges(tiny_qwen35: Path, buffers: int) -> None:
    read = DeviceReader(CPU, chunk=1000, buffers=buffers)  # many pieces per tensor, the buffers used in turn
    for t in open_checkpoint(tiny_qwen35).tensors.values():
        assert torch.equal(read(t), read_stored(t)), t.name
        rows = t.info.row_shape[0]
        for r0, r1 in [(0, rows), (rows // 3, rows), (1, max(1, rows // 2)), (rows - 1, rows)]:
            got = read.rows(t, r0, r1)
            assert got.shape == (r1 - r0, t.info.row_shape[1]) and torch.equal(got, t.read_rows(r0, r1)), (t.name, r0)


def test_truncated_file_is_named(tiny_qwen35: Path, tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen35, src)
    ckpt = open_checkpoint(src)
    t = max(ckpt.tensors.values(), key=lambda t: t.info.end)  # the last tensor of its file
    with open(t.file, "r+b") as f:
        f.truncate(t.info.end - 10)
    with pytest.raises(QstreamError, match=f"{t.name}.*ends early"):
        DeviceReader(CPU, chunk=1000)(t)


class _Copy:
    """What Staging needs of a CUDA event: synchronize(), which here records that it was waited for."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def synchronize(self) -> None:
        self.log.append(f"wait {self.name}")


def test_staging_refills_a_buffer_only_after_its_copy() -> None:
    log: list[str] = []
    st = Staging([torch.empty(4, dtype=torch.uint8) for _ in range(2)])
    order = []
    for piece in range(5):
        i = st.next()
        order.append(i)
        log.append(f"fill {i}")
        st.events[i] = _Copy(log, f"copy of piece {piece}")  # as `copied` records on a copy stream
    assert order == [0, 1, 0, 1, 0]
    assert log == ["fill 0", "fill 1", "wait copy of piece 0", "fill 0", "wait copy of piece 1", "fill 1",
                   "wait copy of piece 2", "fill 0"]


@pytest.mark.parametrize("fixture", ["tiny_qwen35", "tiny_qwen3_moe_fused", "tiny_deepseek_v3"])
def test_pipeline_reads_the_same_chunks_through_it(fixture: str, request: pytest.FixtureRequest) -> None:
    """quantize's reader on CUDA reads rows through a DeviceReader; here onto the CPU, chunk for chunk the same."""
    src: Path = request.getfixturevalue(fixture)
    plan = make_plan(open_checkpoint(src), Selection("all-linear"), Rule.MSE3, 10**9)
    jobs = [j for shard in plan.shards for j in shard.jobs if not (isinstance(j, CopyJob) and j.source.copyable)]
    plain = list(_read_items(iter(jobs)))
    through = list(_read_items(iter(jobs), DeviceReader(CPU, chunk=1000)))
    assert len(plain) == len(through) > 0
    for (job, row, w), (job2, row2, w2) in zip(plain, through):
        assert job is job2 and row == row2
        pairs = zip(w, w2) if isinstance(w, tuple) else [(w, w2)]
        assert all(torch.equal(a, b) for a, b in pairs), (job.source.name, row)
