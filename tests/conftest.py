"""Session-scoped tiny checkpoints (built once per test session, a few seconds in all).

Tests must treat these directories as read-only: write outputs under their own tmp_path.
"""

from __future__ import annotations

import pytest

from tests.fixtures import (
    build_llama,
    build_mixtral,
    build_qwen3_moe,
    build_qwen3_moe_fused,
    build_qwen35_moe,
)


@pytest.fixture(scope="session")
def tiny_qwen35(tmp_path_factory):
    """Qwen3_5MoeForConditionalGeneration in the Qwen3.5-35B-A3B on-disk layout (fused experts, mtp.*, 2 shards)."""
    return build_qwen35_moe(tmp_path_factory.mktemp("ckpt") / "qwen35_moe")


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory):
    """Qwen3MoeForCausalLM, per-expert expert tensors, single model.safetensors."""
    return build_qwen3_moe(tmp_path_factory.mktemp("ckpt") / "qwen3_moe")


@pytest.fixture(scope="session")
def tiny_qwen3_moe_fused(tmp_path_factory):
    """Same weights as tiny_qwen3_moe, experts fused (mlp.experts.gate_up_proj / down_proj, no .weight)."""
    return build_qwen3_moe_fused(tmp_path_factory.mktemp("ckpt") / "qwen3_moe_fused")


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory):
    """MixtralForCausalLM, block_sparse_moe.experts.{e}.w1|w2|w3.weight."""
    return build_mixtral(tmp_path_factory.mktemp("ckpt") / "mixtral")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Dense LlamaForCausalLM, every Linear input dim a multiple of 32."""
    return build_llama(tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture(scope="session")
def tiny_llama_indivisible(tmp_path_factory):
    """Dense LlamaForCausalLM with intermediate_size 80: mlp.down_proj.weight is [64, 80]."""
    return build_llama(tmp_path_factory.mktemp("ckpt") / "llama_indivisible", indivisible=True)
