"""Session-scoped tiny checkpoints (built once per test session, a few seconds in all).

Tests must treat these directories as read-only: write outputs under their own tmp_path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures import (
    build_deepseek_v3,
    build_llama,
    build_mixtral,
    build_qwen3_moe,
    build_qwen3_moe_fused,
    build_qwen35_moe,
)


def _checkpoint(build: Callable[..., Path], doc: str, **kwargs):
    """A session fixture that builds one tiny checkpoint with `build(out_dir, **kwargs)`."""

    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory) -> Path:
        return build(tmp_path_factory.mktemp("ckpt") / build.__name__.removeprefix("build_"), **kwargs)

    fixture.__doc__ = doc
    return fixture


tiny_qwen35 = _checkpoint(
    build_qwen35_moe, "Qwen3_5MoeForConditionalGeneration in the Qwen3.5-35B-A3B on-disk layout "
    "(fused experts, mtp.*, 2 shards).")
tiny_qwen3_moe = _checkpoint(build_qwen3_moe, "Qwen3MoeForCausalLM, per-expert expert tensors, one model.safetensors.")
tiny_qwen3_moe_fused = _checkpoint(
    build_qwen3_moe_fused, "Same weights as tiny_qwen3_moe, experts fused (mlp.experts.gate_up_proj / down_proj).")
tiny_mixtral = _checkpoint(build_mixtral, "MixtralForCausalLM, block_sparse_moe.experts.{e}.w1|w2|w3.weight.")
tiny_llama = _checkpoint(build_llama, "Dense LlamaForCausalLM, every Linear input dim a multiple of 32.")
tiny_llama_indivisible = _checkpoint(
    build_llama, "Dense LlamaForCausalLM with intermediate_size 80: mlp.down_proj.weight is [64, 80].", indivisible=True)
tiny_deepseek_v3 = _checkpoint(build_deepseek_v3, "DeepseekV3ForCausalLM: MLA attention, dense layer 0, shared experts.")
