"""The reference copy: a qstream checkpoint decompressed to bf16 by compressed-tensors' own decoders.

Each `<m>.weight_packed` + `<m>.weight_scale` pair becomes `<m>.weight` as compressed-tensors'
`mxfp4-pack-quantized` compressor decodes it (cast to bf16: exact, an E2M1 value times a power of two fits
bf16). In a mixed-precision checkpoint each kept FP8 `<m>.weight` with its scale is decoded by its config
group's compressor (float-quantized or mxfp8-quantized) and cast to bf16. Every other tensor is kept;
config.json loses its quantization_config. Tiny checkpoints only: it holds one shard in memory at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PACKED, SCALE = ".weight_packed", ".weight_scale"
INPUT_SCALE = ".input_scale"


def _decoders(qc: dict) -> dict[str, object]:
    """Storage ("MXFP4", "FP8", "MXFP8") -> decode(state) by that config group's compressor and arguments."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    from qstream.format.formats import scheme_format

    decoders = {}
    for group in qc["config_groups"].values():
        fmt = group.get("format") or qc["format"]
        args = QuantizationArgs.model_validate(group["weights"])
        scheme = QuantizationScheme(targets=group["targets"], weights=args)
        compressor = BaseCompressor.get_value_from_registry(fmt)
        if args.strategy == "block":
            # The float decompressor infers the strategy from the scale's shape (a [2, 1] block grid reads as
            # per-channel); hand it the group's own arguments instead.
            decoders[scheme_format(group)] = lambda st, a=args: dequantize(st["weight"], st["weight_scale"], args=a)
        else:
            decoders[scheme_format(group)] = lambda st, c=compressor, s=scheme: c.decompress(st, s)["weight"]
    return decoders


def decompress(src: Path, dst: Path) -> Path:
    config = json.loads((src / "config.json").read_text())
    decoders = _decoders(config.pop("quantization_config"))
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json", "config.json"))
    weight_map = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors = load_file(str(f))
        out = {}
        for name, t in tensors.items():
            module = name.rpartition(".")[0]
            if name.endswith(PACKED):
                state = {"weight_packed": t, "weight_scale": tensors[module + SCALE]}
                out[f"{module}.weight"] = decoders["MXFP4"](state).to(torch.bfloat16)
            elif t.dtype == torch.float8_e4m3fn:
                scale = tensors[module + SCALE]
                state = {"weight": t, "weight_scale": scale}
                out[name] = decoders["MXFP8" if scale.dtype == torch.uint8 else "FP8"](state).to(torch.bfloat16)
            elif not name.endswith((SCALE, INPUT_SCALE)):
                out[name] = t
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, f.name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
