"""qstream.planning.selection: tensor names classified by region and role, presets and globs, with reasons."""

from __future__ import annotations

import pytest

from qstream.errors import QstreamError
from qstream.planning.selection import Region, Role, Selection, decide, is_linear_weight, region_of, role_of

# Real tensor names of the layouts qstream reads -> (region, role)
NAMES = {
    "model.language_model.layers.0.mlp.experts.gate_up_proj": (Region.LANGUAGE, Role.ROUTED_EXPERT),  # Qwen3.5 fused
    "model.layers.3.mlp.experts.7.down_proj.weight": (Region.LANGUAGE, Role.ROUTED_EXPERT),
    "model.layers.1.block_sparse_moe.experts.2.w3.weight": (Region.LANGUAGE, Role.ROUTED_EXPERT),  # Mixtral
    "model.layers.1.block_sparse_moe.gate.weight": (Region.LANGUAGE, Role.ROUTER),
    "model.language_model.layers.0.mlp.shared_expert.up_proj.weight": (Region.LANGUAGE, Role.SHARED_EXPERT),
    "model.layers.1.mlp.shared_experts.down_proj.weight": (Region.LANGUAGE, Role.SHARED_EXPERT),  # DeepSeek
    "model.language_model.layers.0.mlp.shared_expert_gate.weight": (Region.LANGUAGE, Role.SHARED_EXPERT_GATE),
    "model.layers.0.mlp.gate_proj.weight": (Region.LANGUAGE, Role.DENSE_MLP),
    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (Region.LANGUAGE, Role.ATTENTION),  # MLA
    "model.language_model.layers.0.linear_attn.in_proj_qkv.weight": (Region.LANGUAGE, Role.LINEAR_ATTENTION),
    "model.visual.blocks.0.attn.qkv.weight": (Region.VISUAL, Role.ATTENTION),
    "mtp.layers.0.mlp.experts.1.gate_proj.weight": (Region.MTP, Role.ROUTED_EXPERT),
    "model.embed_tokens.weight": (Region.LANGUAGE, Role.EMBEDDING),
    "lm_head.weight": (Region.LANGUAGE, Role.LM_HEAD),
    "model.norm.weight": (Region.LANGUAGE, Role.OTHER),
}


@pytest.mark.parametrize("name", NAMES)
def test_region_and_role(name: str) -> None:
    assert (region_of(name), role_of(name)) == NAMES[name]


def test_presets_choose_by_region_and_role() -> None:
    expert, dense = "model.layers.3.mlp.experts.7.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    attn, mtp = "model.layers.0.self_attn.q_proj.weight", "mtp.layers.0.mlp.experts.1.gate_proj.weight"
    shape = (64, 64)
    picked = {p: [n for n in (expert, dense, attn, mtp) if decide(n, shape, Selection(p)).quantize]
              for p in ("experts", "mlp", "all-linear")}
    assert picked == {"experts": [expert], "mlp": [expert, dense], "all-linear": [expert, dense, attn]}
    assert decide(dense, shape, Selection()).reason == "language dense_mlp"
    assert decide(expert, shape, Selection()).reason == "preset experts"


def test_globs_exclude_first_then_include() -> None:
    name = "model.layers.0.mlp.gate_proj.weight"
    sel = Selection("experts", include=("*mlp.*",), exclude=("*layers.0.*",))
    d = decide(name, (64, 64), sel)
    assert (d.quantize, d.reason) == (False, "--exclude '*layers.0.*'")
    d = decide("model.layers.1.mlp.gate_proj.weight", (64, 64), sel)
    assert (d.quantize, d.reason) == (True, "--include '*mlp.*'")


def test_what_cannot_be_mxfp4_is_an_error_naming_the_fix() -> None:
    with pytest.raises(QstreamError, match="vLLM builds router layers unquantized; exclude it"):
        decide("model.layers.1.block_sparse_moe.gate.weight", (4, 64), Selection(include=("*gate*",)))
    with pytest.raises(QstreamError, match=r"shape \[64\] is not a Linear weight"):
        decide("model.layers.0.mlp.up_proj.bias", (64,), Selection("mlp", include=("*up_proj*",)))
    with pytest.raises(QstreamError, match="in_features 80 is not a multiple of 32.*--skip-indivisible"):
        decide("model.layers.0.mlp.down_proj.weight", (64, 80), Selection("mlp"))
    d = decide("model.layers.0.mlp.down_proj.weight", (64, 80), Selection("mlp", skip_indivisible=True))
    assert not d.quantize and "--skip-indivisible" in d.reason
    with pytest.raises(QstreamError, match="unknown preset 'most'; choose one of: experts, mlp, all-linear"):
        Selection("most")


def test_linear_weights_are_what_vllm_builds_as_linear() -> None:
    assert is_linear_weight("model.language_model.layers.0.mlp.experts.gate_up_proj", (8, 64, 64))
    assert is_linear_weight("model.layers.0.self_attn.o_proj.weight", (64, 64))
    assert not is_linear_weight("model.embed_tokens.weight", (256, 64))
    assert not is_linear_weight("model.norm.weight", (64,))
