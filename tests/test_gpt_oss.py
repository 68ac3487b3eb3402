"""gpt-oss's native MXFP4 experts converted losslessly into compressed-tensors per-expert tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qstream.errors import QstreamError
from qstream.format.mxfp4 import dequantize, quantize
from qstream.format.rules import Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.io.source_formats import PackedExperts, decode_checkpoint
from qstream.planning.plan import make_plan
from qstream.planning.selection import Selection
from qstream.quantize import quantize_checkpoint


def build_gpt_oss(out: Path) -> Path:
    """A tiny real GptOssForCausalLM, saved in the released checkpoints' MXFP4 layout:
    experts as `*_blocks` [E, out, in/32, 16] + `*_scales` [E, out, in/32], gate/up rows interleaved."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                       vocab_size=128, layer_types=["sliding_attention", "full_attention"])
    model = GptOssForCausalLM(cfg).to(torch.bfloat16)
    tensors = {}
    for name, p in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w = (p.float() + torch.randn_like(p.float()) * 0.02).transpose(1, 2).contiguous()  # [E, out, in]
            q = quantize(w.to(torch.bfloat16), Rule.FLOOR)
            e, rows, half = q.packed.shape
            tensors[f"{name}_blocks"] = q.packed.reshape(e, rows, half // 16, 16)
            tensors[f"{name}_scales"] = q.scales
        else:
            tensors[name] = p.contiguous() + (torch.randn_like(p) * 0.02 if name.endswith("_bias") else 0)
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = cfg.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def transformers_decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The released decoder of this layout (transformers' gpt-oss integration), as [E, out, in]."""
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    return _convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # it returns [E, in, out]


def test_gpt_oss_converts_losslessly(tmp_path) -> None:
    src = build_gpt_oss(tmp_path / "gpt-oss")
    dst = tmp_path / "q"
    report = quantize_checkpoint(make_plan(open_checkpoint(src), Selection("experts"), Rule.MSE3, 10**9), dst,
                                 device="cpu", progress=False)
    with safe_open(src / "model.safetensors", "pt") as h:
        s = {k: h.get_tensor(k) for k in h.keys()}
    with safe_open(next(dst.glob("*.safetensors")), "pt") as h:
        q = {k: h.get_tensor(k) for k in h.keys()}
    for layer in (0, 1):
        p = f"model.layers.{layer}.mlp.experts"
        gu = transformers_decode(s[f"{p}.gate_up_proj_blocks"], s[f"{p}.gate_up_proj_scales"])
        down = transformers_decode(s[f"{p}.down_proj_blocks"], s[f"{p}.down_proj_scales"])
        for e in range(4):
            for proj, ref in (("gate_proj", gu[e, 0::2]), ("up_proj", gu[e, 1::2]), ("down_proj", down[e])):
                m = f"{p}.{e}.{proj}"
                assert torch.equal(dequantize(q[f"{m}.weight_packed"], q[f"{m}.weight_scale"], torch.float32), ref)
            bias = s[f"{p}.gate_up_proj_bias"][e]
            assert torch.equal(q[f"{p}.{e}.gate_proj.bias"], bias[0::2])
            assert torch.equal(q[f"{p}.{e}.up_proj.bias"], bias[1::2])
            assert torch.equal(q[f"{p}.{e}.down_proj.bias"], s[f"{p}.down_proj_bias"][e])
    assert not any(k.endswith(("_blocks", "_scales", "proj_bias")) for k in q)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.router.bias", "lm_head.weight"):
        assert torch.equal(q[name], s[name])
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "mxfp4-pack-quantized"
    assert all(t["rule"].startswith("lossless") and t["rel_error"] == 0 for t in report["tensors"])


def test_gpt_oss_experts_cannot_be_kept(tmp_path) -> None:
    src = build_gpt_oss(tmp_path / "gpt-oss")
    with pytest.raises(QstreamError, match="converted losslessly"):
        make_plan(open_checkpoint(src), Selection("experts", exclude=("*.layers.0.*",)), Rule.MSE3, 10**9)


def test_packed_experts_read_as_the_values_they_encode(tmp_path) -> None:
    """As a checkpoint tensor, gpt-oss's fused experts read as transformers decodes them (exact in bf16)."""
    src = build_gpt_oss(tmp_path / "gpt-oss")
    experts = decode_checkpoint(open_checkpoint(src)).tensors["model.layers.1.mlp.experts.gate_up_proj"]
    assert isinstance(experts, PackedExperts) and experts.interleaved and experts.stored == ()
    n_exp, rows, n = experts.info.shape
    with safe_open(src / "model.safetensors", "pt") as h:
        ref = transformers_decode(h.get_tensor("model.layers.1.mlp.experts.gate_up_proj_blocks"),
                                  h.get_tensor("model.layers.1.mlp.experts.gate_up_proj_scales"))
    got = torch.cat([experts.read_rows(0, rows + 3), experts.read_rows(rows + 3, n_exp * rows)])
    assert got.dtype == torch.bfloat16 and torch.equal(got.float(), ref.reshape(n_exp * rows, n))
