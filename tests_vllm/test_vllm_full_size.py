"""Slow: vLLM judges a full-size Qwen3.5-35B-A3B-shaped MXFP4 checkpoint made of headers and holes
(tests_vllm/full_size.py), reading no tensor data."""

from __future__ import annotations

import pytest

from qstream.check.vllm import check_with_vllm
from qstream.io.safetensors_io import read_header
from tests_vllm.full_size import build


@pytest.mark.slow
def test_full_size_qwen35_checkpoint_passes_from_headers_alone(tmp_path, vllm_installed):
    dst = build(tmp_path)
    files = list(dst.glob("*.safetensors"))
    assert sum(f.stat().st_blocks for f in files) * 512 < 50e6  # headers only on disk
    packed = [n for f in files for n in read_header(f).tensors if n.endswith(".weight_packed")]
    assert len(packed) == 40 * 256 * 3  # every routed expert projection of the 40 layers
    report = check_with_vllm(dst)
    assert report.ok, report.summary()
    assert report.models == ["Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeMTP"]
    experts = [r for r in report.modules if r.kind == "RoutedExperts"]
    assert [r.quantized for r in experts] == [True] * 40 + [False]  # the MTP layer's experts stay bf16
