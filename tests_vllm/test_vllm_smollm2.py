"""Slow: the real SmolLM2-135M and its exact 4-expert MoE, quantized as `qstream demo` does (MoE: preset
experts; dense: preset mlp), pass check_with_vllm and generate in vLLM the same greedy text as their
compressed-tensors-decompressed copies."""

from __future__ import annotations

import pytest

from qstream import assets
from qstream.check.vllm import check_with_vllm
from qstream.common import cache_dir
from tests_vllm.conftest import qstream, run_vllm
from tests_vllm.decompress import decompress

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "The history of the Roman Empire",
]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory, vllm_installed):
    """{label: (quantized dir, compressed-tensors bf16 dir)} for the demo's two outputs."""
    work = cache_dir() / "vllm-suite"
    dense = assets.build_smollm2_dense(work / "smollm2-135m")
    moe = assets.build_smollm2_moe(dense, work / "smollm2-135m-moe4", num_experts=4)
    out = {}
    for label, src, preset in (("moe", moe, "experts"), ("dense", dense, "mlp")):
        root = tmp_path_factory.mktemp(label)
        qstream("quantize", src, root / "mxfp4", "--preset", preset, "--no-progress")
        out[label] = (root / "mxfp4", decompress(root / "mxfp4", root / "ct-bf16"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("label", ["moe", "dense"])
def test_smollm2_passes_vllm_check_and_generates_as_decoded(smollm2, label, tmp_path):
    quantized, decoded = smollm2[label]
    report = check_with_vllm(quantized)
    assert report.ok, report.summary()
    assert any(r.quantized for r in report.modules)
    texts = run_vllm(quantized, tmp_path / "mxfp4.json", cpu_standins=True, prompts=PROMPTS)
    assert texts == run_vllm(decoded, tmp_path / "ct.json", prompts=PROMPTS)
    assert all(t.strip() for t in texts)
