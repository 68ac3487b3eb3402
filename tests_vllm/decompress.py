"""The reference copy: an MXFP4 checkpoint decompressed to bf16 by compressed-tensors' own decoder.

Each `<m>.weight_packed` + `<m>.weight_scale` pair becomes `<m>.weight` as compressed-tensors'
`mxfp4-pack-quantized` compressor decodes it (cast to bf16: exact, an E2M1 value times a power of two fits
bf16); every other tensor is kept; config.json loses its quantization_config. Tiny checkpoints only: it
holds one shard in memory at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PACKED, SCALE = ".weight_packed", ".weight_scale"


def decompress(src: Path, dst: Path) -> Path:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    config = json.loads((src / "config.json").read_text())
    qc = config.pop("quantization_config")
    (group,) = qc["config_groups"].values()
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs.model_validate(group["weights"]))
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json", "config.json"))
    weight_map = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors = load_file(str(f))
        out = {k: v for k, v in tensors.items() if not k.endswith((PACKED, SCALE))}
        for name in (k for k in tensors if k.endswith(PACKED)):
            module = name.removesuffix(PACKED)
            state = {"weight_packed": tensors[name], "weight_scale": tensors[module + SCALE]}
            out[f"{module}.weight"] = compressor.decompress(state, scheme)["weight"].to(torch.bfloat16)
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, f.name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
