"""A DeepSeek-V3-shaped block-FP8 checkpoint with random weights, written as a stream: the FP8 input path's
memory and speed at real tensor sizes.

One MoE layer (`--experts` routed experts [2048, 7168] / [7168, 2048], MLA attention, a shared expert, the
router in BF16), each weight F8_E4M3 with a float32 `weight_scale_inv` per 128x128 block, and DeepSeek's
`quant_method: fp8` config. 64 experts make 2.9 GB.

    python bench/synthetic_fp8.py OUT --experts 64
    /usr/bin/time -v qstream quantize OUT OUT-mxfp4 --device cpu            # keeps attention in FP8
    /usr/bin/time -v qstream quantize OUT OUT-mxfp4-bf16 --keep-dtype bf16  # writes it as BF16
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from qstream.io.safetensors_io import OutEntry, ShardWriter

HIDDEN, MOE_I, ROUTER_EXPERTS, BLOCK = 7168, 2048, 256, 128
L = "model.layers.3"
ATTENTION = ((f"{L}.self_attn.q_a_proj", 1536, HIDDEN), (f"{L}.self_attn.q_b_proj", 24576, 1536),
             (f"{L}.self_attn.kv_a_proj_with_mqa", 576, HIDDEN), (f"{L}.self_attn.kv_b_proj", 32768, 512),
             (f"{L}.self_attn.o_proj", HIDDEN, 16384))
SHARED = tuple((f"{L}.mlp.shared_experts.{p}", o, i) for p, o, i in
               (("gate_proj", MOE_I, HIDDEN), ("up_proj", MOE_I, HIDDEN), ("down_proj", HIDDEN, MOE_I)))


def modules(experts: int) -> list[tuple[str, int, int]]:
    routed = [(f"{L}.mlp.experts.{e}.{p}", o, i) for e in range(experts)
              for p, o, i in (("gate_proj", MOE_I, HIDDEN), ("up_proj", MOE_I, HIDDEN), ("down_proj", HIDDEN, MOE_I))]
    return [*ATTENTION, *SHARED, *routed]


def write(out: Path, experts: int, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mods = modules(experts)
    router = f"{L}.mlp.gate.weight"
    entries = [OutEntry(router, "BF16", (ROUTER_EXPERTS, HIDDEN))]
    for m, o, i in mods:
        entries += [OutEntry(f"{m}.weight", "F8_E4M3", (o, i)),
                    OutEntry(f"{m}.weight_scale_inv", "F32", (math.ceil(o / BLOCK), math.ceil(i / BLOCK)))]
    writer = ShardWriter(out / "model.safetensors", entries, metadata={"format": "pt"})
    g = torch.Generator().manual_seed(seed)
    writer.write(router, (torch.randn(ROUTER_EXPERTS, HIDDEN, generator=g) * 0.02).bfloat16())
    for m, o, i in mods:  # one tensor in memory at a time
        w = (torch.randn(o, i, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        writer.write(f"{m}.weight", w.view(torch.uint8))
        writer.write(f"{m}.weight_scale_inv", torch.rand(math.ceil(o / BLOCK), math.ceil(i / BLOCK), generator=g) * 1e-4)
    writer.close()
    config = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": HIDDEN,
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [BLOCK, BLOCK]}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--experts", type=int, default=64)
    args = ap.parse_args()
    write(args.out, args.experts)


if __name__ == "__main__":
    main()
