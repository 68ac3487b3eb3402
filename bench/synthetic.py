"""A Qwen3.5-35B-A3B-shaped checkpoint with random weights, written as a stream.

Real tensor names and shapes (FORMAT.md section 3): fused experts [256, 1024, 2048]
(1 GiB in bf16) and [256, 2048, 512], embeddings and lm_head [248320, 2048] (1 GiB
each), DeltaNet layers with full attention every 4th layer. Only the number of
layers is cut, so memory and time per layer are those of the real model.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from qstream.io.safetensors_io import OutEntry, ShardWriter

HIDDEN, EXPERTS, MOE_I, SHARED_I, VOCAB = 2048, 256, 512, 512, 248320
P = "model.language_model"


def layer_tensors(i: int) -> list[tuple[str, tuple[int, ...]]]:
    L = f"{P}.layers.{i}"
    t = [
        (f"{L}.input_layernorm.weight", (HIDDEN,)),
        (f"{L}.post_attention_layernorm.weight", (HIDDEN,)),
        (f"{L}.mlp.gate.weight", (EXPERTS, HIDDEN)),
        (f"{L}.mlp.experts.gate_up_proj", (EXPERTS, 2 * MOE_I, HIDDEN)),
        (f"{L}.mlp.experts.down_proj", (EXPERTS, HIDDEN, MOE_I)),
        (f"{L}.mlp.shared_expert.gate_proj.weight", (SHARED_I, HIDDEN)),
        (f"{L}.mlp.shared_expert.up_proj.weight", (SHARED_I, HIDDEN)),
        (f"{L}.mlp.shared_expert.down_proj.weight", (HIDDEN, SHARED_I)),
        (f"{L}.mlp.shared_expert_gate.weight", (1, HIDDEN)),
    ]
    if i % 4 == 3:
        t += [
            (f"{L}.self_attn.q_proj.weight", (8192, HIDDEN)),
            (f"{L}.self_attn.k_proj.weight", (512, HIDDEN)),
            (f"{L}.self_attn.v_proj.weight", (512, HIDDEN)),
            (f"{L}.self_attn.o_proj.weight", (HIDDEN, 4096)),
            (f"{L}.self_attn.q_norm.weight", (256,)),
            (f"{L}.self_attn.k_norm.weight", (256,)),
        ]
    else:
        t += [
            (f"{L}.linear_attn.in_proj_qkv.weight", (8192, HIDDEN)),
            (f"{L}.linear_attn.in_proj_z.weight", (4096, HIDDEN)),
            (f"{L}.linear_attn.in_proj_b.weight", (32, HIDDEN)),
            (f"{L}.linear_attn.in_proj_a.weight", (32, HIDDEN)),
            (f"{L}.linear_attn.conv1d.weight", (8192, 1, 4)),
            (f"{L}.linear_attn.A_log", (32,)),
            (f"{L}.linear_attn.dt_bias", (32,)),
            (f"{L}.linear_attn.norm.weight", (128,)),
            (f"{L}.linear_attn.out_proj.weight", (HIDDEN, 4096)),
        ]
    return t


def config(layers: int) -> dict:
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "hidden_size": HIDDEN,
            "num_hidden_layers": layers,
            "num_experts": EXPERTS,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": MOE_I,
            "shared_expert_intermediate_size": SHARED_I,
            "vocab_size": VOCAB,
            "max_position_embeddings": 262144,
            "layer_types": ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(layers)],
        },
        "tie_word_embeddings": False,
    }


def write_tensor(w: ShardWriter, name: str, shape: tuple[int, ...], gen: torch.Generator) -> None:
    """Random normal * 0.02 in bf16, written one leading-dim slice at a time."""
    rows = shape[0] if len(shape) > 1 else 1
    per_row = math.prod(shape) // rows
    step = max(1, (16 << 20) // per_row)
    offset = 0
    for r0 in range(0, rows, step):
        n = min(step, rows - r0) * per_row
        data = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
        w.write(name, data, offset)
        offset += n * 2


def build(out: Path, layers: int, seed: int = 0) -> Path:
    """Write `layers` decoder layers plus embeddings and lm_head, one shard per layer."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    groups = [[(f"{P}.embed_tokens.weight", (VOCAB, HIDDEN))]]
    groups += [layer_tensors(i) for i in range(layers)]
    groups += [[(f"{P}.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]]
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        writer = ShardWriter(out / fname, [OutEntry(n, "BF16", s) for n, s in group])
        for name, shape in group:
            write_tensor(writer, name, shape, gen)
            weight_map[name] = fname
        writer.close()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config(layers), indent=2))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=1)
    args = ap.parse_args()
    build(args.out, args.layers)
    print(args.out)
