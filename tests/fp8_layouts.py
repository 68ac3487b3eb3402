"""Tiny checkpoints in the quantized layouts qstream reads (block FP8, compressed-tensors FP8, MXFP8), made
from a bf16 checkpoint by each format's own definition; shared by the default and the vLLM suites."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qstream.planning.selection import role_of

FP8_MAX = 448.0


def _blocks(w: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
    """Per-(bo x bi)-block amax of w, shape [ceil(out/bo), ceil(in/bi)]."""
    out, n = w.shape
    pad = torch.zeros(math.ceil(out / bo) * bo, math.ceil(n / bi) * bi)
    pad[:out, :n] = w.abs()
    return pad.reshape(pad.shape[0] // bo, bo, pad.shape[1] // bi, bi).amax((1, 3))


def _expand(s: torch.Tensor, bo: int, bi: int, shape: tuple[int, int]) -> torch.Tensor:
    return s.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[: shape[0], : shape[1]]


# layout -> (quantization_config, scale suffix, encode(w) -> (fp8 weight, stored scale), decode(fp8, scale))
def _block_fp8(w):
    s = (_blocks(w.float(), 32, 32) / FP8_MAX).clamp(min=1e-12)
    return (w.float() / _expand(s, 32, 32, w.shape)).to(torch.float8_e4m3fn), s


def _channel_fp8(w):
    s = (w.float().abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (w.float() / s).to(torch.float8_e4m3fn), s.to(torch.bfloat16)


def _mxfp8(w):
    amax = _blocks(w.float(), 1, 32).clamp(min=2.0**-100)
    e = torch.floor(torch.log2(amax)) - 8  # largest power of two keeping values within e4m3's range
    return (w.float() / _expand(torch.exp2(e), 1, 32, w.shape)).to(torch.float8_e4m3fn), (e + 127).to(torch.uint8)


LAYOUTS = {
    "fp8-block": ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                   "weight_block_size": [32, 32]}, "weight_scale_inv", _block_fp8,
                  lambda q, s: q.float() * _expand(s.float(), 32, 32, q.shape)),
    "ct-fp8": ({"quant_method": "compressed-tensors", "format": "float-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                    "num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}}},
                "ignore": ["lm_head", "re:.*mlp.gate$"]}, "weight_scale", _channel_fp8,
               lambda q, s: q.float() * s.float()),
    "ct-mxfp8": ({"quant_method": "compressed-tensors", "format": "mxfp8-quantized",
                  "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                      "num_bits": 8, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True,
                      "dynamic": False, "scale_dtype": "torch.uint8"}}},
                  "ignore": ["lm_head", "re:.*mlp.gate$"]}, "weight_scale", _mxfp8,
                 lambda q, s: q.float() * _expand(torch.exp2(s.float() - 127), 1, 32, q.shape)),
}


def to_layout(src: Path, dst: Path, layout: str) -> dict[str, torch.Tensor]:
    """Re-encode every Linear weight (not routers/embeddings/lm_head) of a bf16 checkpoint; returns
    name -> the BF16 values the encoded weight stands for, by the format's own definition."""
    qcfg, suffix, encode, decode = LAYOUTS[layout]
    shutil.copytree(src, dst)
    expected = {}
    for f in sorted(dst.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        out = {}
        for name, w in tensors.items():
            if w.dim() == 2 and name.endswith(".weight") and role_of(name).value in (
                    "routed_expert", "attention", "dense_mlp", "shared_expert"):
                q, s = encode(w)
                out[name], out[name.removesuffix("weight") + suffix] = q, s
                expected[name] = decode(q, s).to(torch.bfloat16)
            else:
                out[name] = w
        save_file(out, f, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (dst / "config.json").write_text(json.dumps(cfg))
    return expected
