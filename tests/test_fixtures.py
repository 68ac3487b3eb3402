"""Sanity checks of the tiny checkpoints in tests/fixtures.py: names on disk, shapes, reload with transformers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.fixtures import (
    GENERATION_CONFIG,
    LICENSE_TEXT,
    assert_same_files,
    build_qwen3_moe,
    build_qwen35_moe,
    first_difference,
    read_index,
    tensor_shapes,
)

transformers = pytest.importorskip("transformers")

P35 = "model.language_model.layers"


def _load(cls, path: Path):
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.bfloat16)
    return model, info


def _assert_clean_load(info, allowed_unexpected=r"$^"):
    assert not info["missing_keys"], info["missing_keys"]
    unexpected = [k for k in info["unexpected_keys"] if not re.match(allowed_unexpected, k)]
    assert not unexpected, unexpected
    assert not info.get("mismatched_keys"), info.get("mismatched_keys")


def _linear_inputs_ok(shapes, exempt=()):
    """Every 2-D weight / 3-D fused expert tensor has an input (last) dim that is a multiple of 32."""
    bad = []
    for name, (shape, _) in shapes.items():
        if name in exempt or "embed_tokens" in name or "pos_embed" in name or "conv1d" in name:
            continue
        if len(shape) in (2, 3) and shape[-1] % 32:
            bad.append((name, shape))
    return bad


@pytest.mark.parametrize(
    "fixture", ["tiny_qwen35", "tiny_qwen3_moe", "tiny_qwen3_moe_fused", "tiny_mixtral", "tiny_llama"]
)
def test_side_files_bf16_and_dims(fixture, request):
    ckpt = request.getfixturevalue(fixture)
    assert json.loads((ckpt / "generation_config.json").read_text()) == GENERATION_CONFIG
    assert (ckpt / "LICENSE").read_text() == LICENSE_TEXT
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] and cfg["model_type"]
    shapes = tensor_shapes(ckpt)
    assert shapes and all(dt == "BF16" for _, dt in shapes.values())
    assert _linear_inputs_ok(shapes) == []


def test_qwen35_layout(tiny_qwen35):
    cfg = json.loads((tiny_qwen35 / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5_moe"
    assert cfg["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    tc = cfg["text_config"]
    assert tc["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert tc["num_experts"] == 8 and tc["num_experts_per_tok"] == 2 and tc["mtp_num_hidden_layers"] == 1
    assert "vision_config" in cfg and "quantization_config" not in cfg

    # sharded: 2 files + index that covers exactly the tensors on disk
    index = read_index(tiny_qwen35)
    assert index is not None and len(set(index.values())) == 2
    assert not (tiny_qwen35 / "model.safetensors").exists()
    shapes = tensor_shapes(tiny_qwen35)
    assert set(index) == set(shapes)
    for name, fname in index.items():
        with safe_open(str(tiny_qwen35 / fname), "pt") as f:
            assert name in f.keys()

    E, I, H = 8, 32, 64
    for n in range(4):
        p = f"{P35}.{n}"
        assert shapes[f"{p}.mlp.experts.gate_up_proj"][0] == (E, 2 * I, H)
        assert shapes[f"{p}.mlp.experts.down_proj"][0] == (E, H, I)
        assert f"{p}.mlp.experts.gate_up_proj.weight" not in shapes
        assert not any(k.startswith(f"{p}.mlp.experts.0.") for k in shapes)
        assert shapes[f"{p}.mlp.gate.weight"][0] == (E, H)
        assert shapes[f"{p}.mlp.shared_expert_gate.weight"][0] == (1, H)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"{p}.mlp.shared_expert.{proj}.weight" in shapes
        if n < 3:
            for t in ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight",
                      "out_proj.weight", "conv1d.weight", "A_log", "dt_bias", "norm.weight"):
                assert f"{p}.linear_attn.{t}" in shapes, t
            assert not any(k.startswith(f"{p}.self_attn.") for k in shapes)
        else:
            for t in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
                assert f"{p}.self_attn.{t}.weight" in shapes, t
            assert not any(k.startswith(f"{p}.linear_attn.") for k in shapes)
    assert "lm_head.weight" in shapes and "model.language_model.embed_tokens.weight" in shapes
    assert any(k.startswith("model.visual.blocks.") for k in shapes)
    assert any(k.startswith("model.visual.merger.") for k in shapes)

    # hand-added MTP: real names and shapes, experts per expert
    assert shapes["mtp.fc.weight"][0] == (H, 2 * H)
    for k in ("mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight"):
        assert shapes[k][0] == (H,)
    for e in range(E):
        assert shapes[f"mtp.layers.0.mlp.experts.{e}.gate_proj.weight"][0] == (I, H)
        assert shapes[f"mtp.layers.0.mlp.experts.{e}.up_proj.weight"][0] == (I, H)
        assert shapes[f"mtp.layers.0.mlp.experts.{e}.down_proj.weight"][0] == (H, I)
    assert "mtp.layers.0.mlp.experts.gate_up_proj" not in shapes
    for k in ("mlp.gate.weight", "mlp.shared_expert_gate.weight", "mlp.shared_expert.gate_proj.weight",
              "self_attn.q_proj.weight", "self_attn.q_norm.weight", "input_layernorm.weight"):
        assert f"mtp.layers.0.{k}" in shapes, k


def test_qwen35_reloads(tiny_qwen35):
    from transformers import Qwen3_5MoeForConditionalGeneration

    model, info = _load(Qwen3_5MoeForConditionalGeneration, tiny_qwen35)
    _assert_clean_load(info, r"^mtp\.")
    # weights really came from disk (fused experts loaded as-is, gate rows first)
    with safe_open(str(tiny_qwen35 / read_index(tiny_qwen35)[f"{P35}.1.mlp.experts.gate_up_proj"]), "pt") as f:
        disk = f.get_tensor(f"{P35}.1.mlp.experts.gate_up_proj")
    assert torch.equal(model.model.language_model.layers[1].mlp.experts.gate_up_proj.data, disk)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(12).reshape(1, 12)).logits
    assert logits.shape == (1, 12, 256) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "fixture,experts_re",
    [
        ("tiny_qwen3_moe", r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight"),
        ("tiny_qwen3_moe_fused", r"model\.layers\.\d+\.mlp\.experts\.(gate_up|down)_proj"),
        ("tiny_mixtral", r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight"),
    ],
)
def test_moe_layouts_and_reload(fixture, experts_re, request):
    from transformers import AutoModelForCausalLM

    ckpt = request.getfixturevalue(fixture)
    assert (ckpt / "model.safetensors").exists() and read_index(ckpt) is None
    shapes = tensor_shapes(ckpt)
    experts = [k for k in shapes if ".experts." in k]
    assert experts and all(re.fullmatch(experts_re, k) for k in experts), experts[:5]
    n_layers = 2 if fixture == "tiny_mixtral" else 4
    n_exp = 4 if fixture == "tiny_mixtral" else 8
    per_layer = 2 if fixture.endswith("fused") else 3 * n_exp
    assert len(experts) == n_layers * per_layer
    router = "block_sparse_moe.gate.weight" if fixture == "tiny_mixtral" else "mlp.gate.weight"
    assert all(f"model.layers.{n}.{router}" in shapes for n in range(n_layers))
    model, info = _load(AutoModelForCausalLM, ckpt)
    _assert_clean_load(info)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(8)[None]).logits).all()


def test_qwen3_moe_fused_same_weights(tiny_qwen3_moe, tiny_qwen3_moe_fused):
    from safetensors.torch import load_file

    per = load_file(str(tiny_qwen3_moe / "model.safetensors"))
    fused = load_file(str(tiny_qwen3_moe_fused / "model.safetensors"))
    gu, down = fused["model.layers.2.mlp.experts.gate_up_proj"], fused["model.layers.2.mlp.experts.down_proj"]
    assert torch.equal(gu[5, :32], per["model.layers.2.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(gu[5, 32:], per["model.layers.2.mlp.experts.5.up_proj.weight"])
    assert torch.equal(down[5], per["model.layers.2.mlp.experts.5.down_proj.weight"])
    assert torch.equal(fused["model.layers.2.self_attn.q_proj.weight"], per["model.layers.2.self_attn.q_proj.weight"])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_indivisible"])
def test_llama(fixture, request):
    from transformers import AutoModelForCausalLM

    ckpt = request.getfixturevalue(fixture)
    shapes = tensor_shapes(ckpt)
    inter = 80 if fixture.endswith("indivisible") else 128
    assert shapes["model.layers.1.mlp.down_proj.weight"][0] == (64, inter)
    assert shapes["model.layers.1.mlp.gate_proj.weight"][0] == (inter, 64)
    assert "lm_head.weight" in shapes and not any(".experts." in k for k in shapes)
    exempt = {f"model.layers.{n}.mlp.down_proj.weight" for n in range(2)} if inter == 80 else set()
    assert _linear_inputs_ok(shapes, exempt) == []
    if inter == 80:
        assert all(shapes[k][0][-1] % 32 for k in exempt)
    model, info = _load(AutoModelForCausalLM, ckpt)
    _assert_clean_load(info)


def test_builders_deterministic(tmp_path):
    a = build_qwen3_moe(tmp_path / "a", seed=3)
    b = build_qwen3_moe(tmp_path / "b", seed=3)
    c = build_qwen3_moe(tmp_path / "c", seed=4)
    assert_same_files(a, b)
    assert first_difference((a / "model.safetensors").read_bytes(), (c / "model.safetensors").read_bytes())
    q1 = build_qwen35_moe(tmp_path / "q1", seed=0)
    q2 = build_qwen35_moe(tmp_path / "q2", seed=0)
    assert_same_files(q1, q2)


def test_byte_comparisons_report_briefly(tmp_path) -> None:
    """A failing comparison of large files names where they differ in one short line, never their contents."""
    big = bytes(range(256)) * 20_000
    changed = big[:3_000_000] + b"\xff" + big[3_000_001:]
    msg = first_difference(big, changed)
    assert msg.startswith("5,120,000 vs 5,120,000 bytes, first difference at byte 3,000,000: ") and len(msg) < 150
    assert first_difference(big, big[:-1]) == "5,120,000 vs 5,119,999 bytes, first difference at byte 5,119,999: ff vs "
    assert first_difference(b"a\nb\nc\n", b"a\nB\nc\n") == "6 vs 6 bytes, first difference on line 2: 'b' vs 'B'"
    for name, data in (("x.bin", big), ("y.txt", b"same\n")):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "a" / name).write_bytes(data)
        (tmp_path / "b" / name).write_bytes(changed if name == "x.bin" else data)
    with pytest.raises(pytest.fail.Exception) as failed:
        assert_same_files(tmp_path / "a", tmp_path / "b")
    assert "x.bin" in str(failed.value) and "3,000,000" in str(failed.value) and len(str(failed.value)) < 400
    assert assert_same_files(tmp_path / "a", tmp_path / "b", skip=("x.bin",)) == ["y.txt"]
