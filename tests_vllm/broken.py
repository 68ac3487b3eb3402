"""Deliberately broken copies of a good per-expert MXFP4 checkpoint (`qstream quantize` output of a
Qwen3-MoE or Mixtral): each is a bug some MoE quantizer has shipped, and `check_with_vllm` must reject it.

A breaker edits (tensors, config) in place, given the bf16 source's tensors; it finds its targets by
pattern, so it works on both expert namings (gate_proj/up_proj/down_proj and w1/w3/w2).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qstream.format.mxfp4 import quantize
from qstream.format.rules import Rule

Breaker = Callable[[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]], None]
ROUTER = re.compile(r"^model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.gate\.weight$")


def _expert(tensors, layer: int, expert: int) -> list[str]:
    """Checkpoint modules of one expert: `...layers.<layer>....experts.<expert>.<proj>`."""
    pat = re.compile(rf"^(model\.layers\.{layer}\..*\.experts\.{expert}\.\w+)\.weight_packed$")
    return sorted(m[1] for n in tensors if (m := pat.match(n)))


def _ignore(config) -> list[str]:
    return config["quantization_config"]["ignore"]


def missing_expert(tensors, config, source) -> None:
    """Expert 3 of layer 1 left out: vLLM serves uninitialised memory for it."""
    for module in _expert(tensors, 1, 3):
        del tensors[f"{module}.weight_packed"], tensors[f"{module}.weight_scale"]


def missing_scale(tensors, config, source) -> None:
    """One projection's scales left out: vLLM multiplies its codes by garbage."""
    del tensors[f"{_expert(tensors, 1, 2)[0]}.weight_scale"]


def float_scales(tensors, config, source) -> None:
    """One projection's scales stored decoded, as float32 2^(E-127), not E8M0 bytes: vLLM's loader casts
    them into its uint8 parameter without a word (to 0 or 1)."""
    name = f"{_expert(tensors, 1, 2)[0]}.weight_scale"
    tensors[name] = torch.exp2(tensors[name].float() - 127)


def quantized_router(tensors, config, source) -> None:
    """Every router quantized and dropped from the ignore list."""
    for name in [n for n in tensors if ROUTER.match(n)]:
        q = quantize(source[name].float(), Rule.EVEN)
        module = name.removesuffix(".weight")
        del tensors[name]
        tensors[f"{module}.weight_packed"], tensors[f"{module}.weight_scale"] = q.packed, q.scales
    config["quantization_config"]["ignore"] = [e for e in _ignore(config) if "gate|router" not in e]


def unignored_bf16_linear(tensors, config, source) -> None:
    """Attention left in bf16 but dropped from the ignore list: vLLM expects it quantized."""
    config["quantization_config"]["ignore"] = [e for e in _ignore(config) if "self_attn" not in e]


def expert0_unquantized(tensors, config, source) -> None:
    """Layer 1's expert 0 kept in bf16 and ignored by exact name, the other experts MXFP4. vLLM takes the
    layer's scheme from expert 0, so it builds all experts unquantized."""
    for module in _expert(tensors, 1, 0):
        del tensors[f"{module}.weight_packed"], tensors[f"{module}.weight_scale"]
        tensors[f"{module}.weight"] = source[f"{module}.weight"]
        _ignore(config).append(module)


BREAKERS: dict[str, Breaker] = {
    f.__name__: f
    for f in (missing_expert, missing_scale, float_scales, quantized_router, unignored_bf16_linear, expert0_unquantized)
}


def make_broken(good: Path, source: Path, out: Path, breaker: Breaker) -> Path:
    """Copy `good` (a single-shard checkpoint) to `out` with one breakage; the index is rewritten."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(good, out)
    (shard,) = out.glob("*.safetensors")
    tensors = load_file(str(shard))
    config = json.loads((out / "config.json").read_text())
    src = {k: v for f in source.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    breaker(tensors, config, src)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {}, "weight_map": dict.fromkeys(sorted(tensors), shard.name)}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out
