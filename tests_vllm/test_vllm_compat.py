"""vLLM itself judges qstream's output: its loaders take every tensor where the checkpoint means it, and
its forward pass on the MXFP4 checkpoint equals, bit for bit, its forward pass on the same checkpoint
decoded by compressed-tensors; broken checkpoints that vLLM would load silently are rejected."""

from __future__ import annotations

import statistics

import pytest

from qstream.check.vllm import check_with_vllm
from tests_vllm.broken import BREAKERS, make_broken
from tests_vllm.conftest import LAYOUTS, run_vllm

# What vLLM must build quantized (vLLM layer class -> storage) for each layout's quantize preset: MXFP4 where
# qstream quantized, and the input's FP8/MXFP8 kept where it did not.
QUANTIZED_KINDS = {
    "qwen35_moe": {"RoutedExperts": "MXFP4"},
    "qwen3_moe": {"RoutedExperts": "MXFP4"},
    "mixtral": {"RoutedExperts": "MXFP4"},
    "llama": {"MergedColumnParallelLinear": "MXFP4", "RowParallelLinear": "MXFP4"},
    "qwen3_moe_fp8_block": {"RoutedExperts": "MXFP4", "QKVParallelLinear": "FP8", "RowParallelLinear": "FP8"},
    "llama_ct_fp8_channel": {"MergedColumnParallelLinear": "MXFP4", "RowParallelLinear": "FP8+MXFP4",
                             "QKVParallelLinear": "FP8"},
    "qwen3_moe_mxfp8": {"RoutedExperts": "MXFP4", "QKVParallelLinear": "MXFP8", "RowParallelLinear": "MXFP8"},
    "llama_gptq": {"MergedColumnParallelLinear": "MXFP4", "RowParallelLinear": "MXFP4"},
    "qwen35_moe_gptq": {"RoutedExperts": "MXFP4"},
}
CLOSE = 0.1  # |logprob - bf16 source's| over the spread of the source's logprobs: MXFP4 gives 1-3%


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vllm_loads_qstream_output_as_meant(checkpoints, layout):
    report = check_with_vllm(checkpoints(layout).quantized)
    assert report.ok, report.summary()
    assert report.vllm_version in report.summary()
    quantized = [r for r in report.modules if r.quantized]
    kinds: dict[str, set[str]] = {}
    for r in quantized:
        kinds.setdefault(r.kind, set()).add(r.built)
    assert {k: "+".join(sorted(v)) for k, v in kinds.items()} == QUANTIZED_KINDS[layout]
    assert all(r.holds == (r.built,) for r in quantized)
    assert all(r.holds == ("BF16",) for r in report.modules if not r.quantized and r.holds)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vllm_logprobs_equal_compressed_tensors_decoding(checkpoints, layout, prompt_ids, tmp_path):
    c = checkpoints(layout)
    mxfp4 = run_vllm(c.quantized, tmp_path / "mxfp4.json", cpu_standins=True, prompt_ids=prompt_ids)
    decoded = run_vllm(c.decompressed, tmp_path / "ct.json", prompt_ids=prompt_ids)
    source = run_vllm(c.source, tmp_path / "bf16.json", prompt_ids=prompt_ids)
    assert mxfp4 == decoded  # every position, every vocabulary entry, bit for bit
    deviation = spread = 0.0
    for q_prompt, s_prompt in zip(mxfp4, source):
        for q, s in zip(q_prompt[1:], s_prompt[1:]):  # position 0 has no logprobs
            mean = statistics.fmean(s.values())
            deviation += sum(abs(q[t] - s[t]) for t in s)
            spread += sum(abs(v - mean) for v in s.values())
    assert 0 < deviation / spread < CLOSE


@pytest.mark.parametrize("base", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("breaker", BREAKERS)
def test_vllm_check_rejects_broken_checkpoints(checkpoints, base, breaker, tmp_path):
    c = checkpoints(base)
    report = check_with_vllm(make_broken(c.quantized, c.source, tmp_path / breaker, BREAKERS[breaker]))
    problems = "\n".join(report.problems)
    if (base, breaker) == ("qwen3_moe", "quantized_router"):
        # vLLM 0.32 builds Qwen3-MoE's router (GateLinear) from the quantization config, so a router that is
        # quantized and not ignored is legal there; Mixtral's and Qwen3.5's routers are always bf16.
        assert report.ok, report.summary()
        assert all(r.quantized and r.holds == ("MXFP4",) for r in report.modules if r.name.endswith("mlp.gate"))
        return
    assert not report.ok
    expected = {
        "missing_expert": "of experts 3: nothing writes it",
        "missing_scale": "weight_scale",
        "float_scales": "of dtype F32 (vLLM casts it silently)",
        "quantized_router": "gate.weight_packed",
        "unignored_bf16_linear": "self_attn",
        "expert0_unquantized": "experts.1.",
    }[breaker]
    assert expected in problems, report.summary()
    if breaker == "expert0_unquantized":  # vLLM took layer 1's scheme from expert 0: all its experts bf16
        (row,) = [r for r in report.modules if r.name.startswith("model.layers.1.") and r.kind == "RoutedExperts"]
        assert not row.quantized


def test_vllm_itself_loads_a_missing_expert_silently(checkpoints, prompt_ids, tmp_path):
    """Why the check exists: vLLM serves this broken checkpoint without a word."""
    c = checkpoints("qwen3_moe")
    broken = make_broken(c.quantized, c.source, tmp_path / "broken", BREAKERS["missing_expert"])
    assert run_vllm(broken, tmp_path / "out.json", cpu_standins=True, prompt_ids=prompt_ids)
    assert not check_with_vllm(broken).ok


def test_vllm_loads_kept_fp8_experts_beside_mxfp4_ones(vllm_installed, tmp_path):
    """Excluding one layer's experts from an FP8 input keeps them FP8: vLLM takes that layer's MoE scheme as
    FP8 and the other layers' as MXFP4, from one mixed-precision config."""
    from tests.fp8_layouts import to_layout
    from tests_vllm import fixtures
    from tests_vllm.conftest import qstream

    src = fixtures.build_qwen3_moe(tmp_path / "bf16")
    to_layout(src, tmp_path / "fp8", "fp8-block")
    qstream("quantize", tmp_path / "fp8", tmp_path / "q", "--no-progress", "--exclude", "*.layers.0.mlp.experts.*")
    report = check_with_vllm(tmp_path / "q")
    assert report.ok, report.summary()
    experts = {r.name.split(".")[2]: r.built for r in report.modules if r.kind == "RoutedExperts"}
    assert experts == {"0": "FP8", "1": "MXFP4", "2": "MXFP4", "3": "MXFP4"}
    assert all(r.holds == (r.built,) for r in report.modules if r.quantized)


def test_vllm_loads_deepseek_v3_with_mla_kept_in_fp8(vllm_installed, tmp_path):
    """DeepSeek-V3's block-FP8 layout: vLLM builds the routed experts MXFP4 and the MLA projections (fused
    q_a/kv_a included), the dense layer and the shared expert FP8, and loads every tensor where it belongs."""
    from tests.fixtures import build_deepseek_v3
    from tests.fp8_layouts import to_layout
    from tests_vllm.conftest import qstream

    to_layout(build_deepseek_v3(tmp_path / "bf16"), tmp_path / "fp8", "fp8-block")
    qstream("quantize", tmp_path / "fp8", tmp_path / "q", "--no-progress")
    report = check_with_vllm(tmp_path / "q")
    assert report.ok, report.summary()
    built = {(r.name.rsplit(".", 1)[-1], r.built) for r in report.modules if r.quantized}
    assert ("routed_experts", "MXFP4") in built and ("fused_qkv_a_proj", "FP8") in built, report.summary()
    assert all(r.holds == (r.built,) for r in report.modules if r.quantized)
