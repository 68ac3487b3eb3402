"""The same input gives byte-identical output across runs, thread counts and devices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qstream.common import REPORT_NAME


def outputs(d: Path) -> dict[str, bytes]:
    """Every file but the report (which records times and the device)."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name not in (REPORT_NAME, "README.md")}


def quantize(src: Path, dst: Path, threads: int, device: str = "cpu") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, "-m", "qstream", "quantize", str(src), str(dst), "--device", device,
                        "--no-progress", "--max-shard-size", "200KiB"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_thread_counts_and_reruns_agree(tmp_path, tiny_qwen35) -> None:
    quantize(tiny_qwen35, tmp_path / "a", threads=1)
    quantize(tiny_qwen35, tmp_path / "b", threads=2)
    quantize(tiny_qwen35, tmp_path / "c", threads=2)
    a, b, c = (outputs(tmp_path / x) for x in "abc")
    assert a == b == c and any(k.endswith(".safetensors") for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu(tmp_path, tiny_qwen35) -> None:
    quantize(tiny_qwen35, tmp_path / "cpu", threads=2, device="cpu")
    quantize(tiny_qwen35, tmp_path / "cuda", threads=2, device="cuda")
    assert outputs(tmp_path / "cpu") == outputs(tmp_path / "cuda")
