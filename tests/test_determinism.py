"""The same input gives byte-identical output across runs, thread counts and devices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qstream.common import REPORT_NAME
from tests.fixtures import assert_same_files


def quantize(src: Path, dst: Path, threads: int, device: str = "cpu") -> Path:
    dst.parent.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, "-m", "qstream", "quantize", str(src), str(dst), "--device", device,
                        "--no-progress", "--max-shard-size", "200KiB"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return dst


def test_thread_counts_and_reruns_agree(tmp_path, tiny_qwen35) -> None:
    """Every file but the report (which records times, memory and the device), the model card included.
    Each run writes a directory of the same name (the card is titled with it) in its own parent."""
    a, b, c = (quantize(tiny_qwen35, tmp_path / run / "q", threads) for run, threads in (("a", 1), ("b", 2), ("c", 2)))
    names = assert_same_files(a, b, skip=(REPORT_NAME,))
    assert_same_files(a, c, skip=(REPORT_NAME,))
    assert "README.md" in names and any(n.endswith(".safetensors") for n in names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu(tmp_path, tiny_qwen35) -> None:
    cpu = quantize(tiny_qwen35, tmp_path / "cpu" / "q", threads=2, device="cpu")
    cuda = quantize(tiny_qwen35, tmp_path / "cuda" / "q", threads=2, device="cuda")
    assert_same_files(cpu, cuda, skip=(REPORT_NAME,))
