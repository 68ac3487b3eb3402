"""Tiny real checkpoints that vLLM's CPU kernels can run.

Same models, layouts and seeding as tests/fixtures.py (real transformers classes, bf16, the on-disk layout
of the real checkpoints), with the head sizes vLLM's CPU kernels accept: attention heads of 64 (the default
fixtures' 16 and 32 are refused: "Unsupported CPU attention configuration"), and for Qwen3.5 the real 128
for both attention and Gated DeltaNet heads (its CPU DeltaNet kernel needs them).
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from tests.fixtures import (
    QWEN35_SHARDS,
    QWEN35_TEXT,
    QWEN35_VISION,
    _qwen35_mtp_tensors,
    _save,
    _seeded_model,
    _write_sharded,
)

HEAD = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64)

QWEN35_TEXT_128 = {
    **QWEN35_TEXT,
    "head_dim": 128,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    # 128 * 0.25 = 32 rotary dims = 16 frequencies, split over (t, h, w) like the real [11, 11, 10] of 256
    "rope_parameters": {**QWEN35_TEXT["rope_parameters"], "mrope_section": [6, 5, 5]},
}


def build_qwen35_moe(out_dir: Path, seed: int = 0) -> Path:
    """Qwen3_5MoeForConditionalGeneration in the Qwen3.5-35B-A3B layout (fused experts, visual, per-expert
    MTP, 2 shards + index) with real head sizes."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    config = Qwen3_5MoeConfig(text_config=dict(QWEN35_TEXT_128), vision_config=dict(QWEN35_VISION),
                              tie_word_embeddings=False)
    model = _seeded_model(Qwen3_5MoeForConditionalGeneration, config, seed)
    out_dir = _save(model, out_dir, fused=True)
    single = out_dir / "model.safetensors"
    tensors = load_file(str(single))
    single.unlink()
    tensors.update(_qwen35_mtp_tensors(model, model.config.text_config, seed))
    _write_sharded(out_dir, tensors, QWEN35_SHARDS)
    return out_dir


def build_qwen3_moe(out_dir: Path, seed: int = 0) -> Path:
    """Qwen3MoeForCausalLM, experts stored per expert."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                            mlp_only_layers=[], norm_topk_prob=True, max_position_embeddings=512,
                            tie_word_embeddings=False, **HEAD)
    return _save(_seeded_model(Qwen3MoeForCausalLM, config, seed), out_dir, fused=False)


def build_mixtral(out_dir: Path, seed: int = 0) -> Path:
    """MixtralForCausalLM: block_sparse_moe.experts.{e}.w1|w2|w3."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                           num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                           tie_word_embeddings=False, **HEAD)
    return _save(_seeded_model(MixtralForCausalLM, config, seed), out_dir, fused=False)


def build_llama(out_dir: Path, seed: int = 0) -> Path:
    """Dense LlamaForCausalLM (quantized with --preset mlp)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         max_position_embeddings=512, tie_word_embeddings=False, **HEAD)
    return _save(_seeded_model(LlamaForCausalLM, config, seed), out_dir, fused=False)
