"""qstream.planning.targets and format.names: the ignore list and group targets, built and checked as vLLM
matches module names (merged names, renamed prefixes, expert-0 probes)."""

from __future__ import annotations

import pytest

from qstream.errors import QstreamError
from qstream.format.formats import BF16, FP8, MXFP4
from qstream.format.names import matches, merged_name
from qstream.planning.selection import region_of, role_of
from qstream.planning.targets import (
    Module,
    build_cover,
    build_ignore,
    check_merges,
    resolve,
    targeting_problems,
    variants,
)


def module(name: str, fmt: str) -> Module:
    """A module as the planner sees it: one layer's experts are `<layer>.experts`."""
    probe = name + ".0.gate_proj.weight" if name.endswith(".experts") else name + ".weight"
    return Module(name, region_of(probe), role_of(probe), fmt)


MODULES = [
    module("model.language_model.layers.0.mlp.experts", MXFP4),
    module("model.language_model.layers.0.mlp.shared_expert.gate_proj", BF16),
    module("model.language_model.layers.0.mlp.shared_expert.up_proj", BF16),
    module("model.language_model.layers.0.self_attn.q_proj", BF16),
    module("model.language_model.layers.0.self_attn.k_proj", BF16),
    module("model.language_model.layers.0.self_attn.v_proj", BF16),
    module("model.language_model.layers.1.linear_attn.in_proj_qkv", FP8),
    module("model.language_model.layers.1.linear_attn.in_proj_z", FP8),
    module("model.visual.blocks.0.attn.qkv", BF16),
    module("mtp.layers.0.mlp.experts", BF16),
    module("lm_head", BF16),
]


def test_matching_rule_is_vllms() -> None:
    assert matches(["re:.*\\.self_attn\\..*"], "model.layers.0.self_attn.qkv_proj")
    assert not matches(["re:self_attn"], "model.layers.0.self_attn.qkv_proj")  # re.match: anchored at the start
    assert matches(["lm_head"], "lm_head") and not matches(["lm_head"], "language_model.lm_head")
    assert merged_name("model.layers.0.self_attn.k_proj") == "model.layers.0.self_attn.qkv_proj"
    assert merged_name("model.layers.0.mlp.down_proj") == "model.layers.0.mlp.down_proj"


def test_variants_are_every_name_vllm_may_use() -> None:
    q = module("model.language_model.layers.0.self_attn.q_proj", BF16)
    assert set(variants(q)) == {
        "model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.self_attn.qkv_proj",
        "language_model.model.layers.0.self_attn.q_proj", "language_model.model.layers.0.self_attn.qkv_proj",
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.qkv_proj"}
    experts = variants(module("model.language_model.layers.0.mlp.experts", MXFP4))
    assert "model.language_model.layers.0.mlp.experts.0.gate_proj" in experts
    assert "model.layers.0.mlp.experts.0.w1" in experts  # renamed prefix, Mixtral's probe name


def test_ignore_and_covers_resolve_every_module_to_its_format() -> None:
    ignore = build_ignore(MODULES)
    qc = {"ignore": ignore, "config_groups": {
        "group_0": {"targets": build_cover(MODULES, MXFP4), "weights": {"num_bits": 4, "type": "float", "group_size": 32}},
        "group_1": {"targets": build_cover(MODULES, FP8), "weights": {"num_bits": 8, "type": "float",
                                                                      "strategy": "channel"}}}}
    assert targeting_problems(qc, MODULES) == []
    for m in MODULES:
        assert {resolve(qc, v) for v in variants(m)} == {m.fmt}, m.name
    assert "re:.*\\.self_attn\\..*" in ignore  # a coarse entry where it hits nothing quantized


def test_a_wrong_ignore_list_is_caught_per_name() -> None:
    qc = {"ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "float", "group_size": 32}}}}
    problems = targeting_problems(qc, MODULES)
    assert "model.language_model.layers.0.self_attn.qkv_proj: BF16 on disk but not ignored " \
           "(vLLM would load it as zeros)" in problems
    assert any(p.startswith("model.language_model.layers.1.linear_attn.in_proj_qkv: FP8 on disk but its config "
                            "group is MXFP4") for p in problems)
    assert not any(p.startswith("lm_head:") for p in problems)


def test_parts_of_one_vllm_module_must_agree() -> None:
    parts = [module("model.layers.0.self_attn.q_proj", MXFP4), module("model.layers.0.self_attn.k_proj", BF16)]
    with pytest.raises(QstreamError, match="model.layers.0.self_attn.qkv_proj: vLLM loads its parts as one module"):
        check_merges(parts)
