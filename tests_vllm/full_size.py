"""A full-size Qwen3.5-35B-A3B-shaped MXFP4 checkpoint made of headers and holes, judged by vLLM.

The source is every tensor of Qwen/Qwen3.5-35B-A3B by name, dtype and shape (the transformers model built
on the meta device for the 40 text layers and the 27-block vision tower, plus the MTP head, whose experts
are stored per expert), written as sparse safetensors files: a real header, then a hole. The MXFP4 output
is what `qstream quantize` would write, taken from the same plan (headers, config with its ignore list,
index), again with holes for data. `check_with_vllm` never reads tensor bytes, so this is a faithful and
free test of it at full size.

    python -m tests_vllm.full_size WORKDIR     # prints vLLM's verdict, its time and peak memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from qstream.format.rules import Rule
from qstream.io.checkpoint import CONFIG_NAME, INDEX_NAME, open_checkpoint
from qstream.io.safetensors_io import DTYPE_NAMES, OutEntry, ShardWriter
from qstream.planning.plan import make_plan, parse_size
from qstream.planning.selection import Selection

# Qwen/Qwen3.5-35B-A3B config.json settings that differ from transformers' Qwen3_5MoeConfig defaults.
TEXT = dict(
    max_position_embeddings=262144,
    mtp_num_hidden_layers=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [11, 11, 10], "mrope_interleaved": True},
)
VISION = dict(out_hidden_size=2048)  # the vision merger projects into the text hidden size
SHARD_BYTES = 5 * 10**9


def source_config():
    from transformers import Qwen3_5MoeConfig

    config = Qwen3_5MoeConfig(text_config=TEXT, vision_config=VISION, tie_word_embeddings=False)
    config.architectures = ["Qwen3_5MoeForConditionalGeneration"]
    return config


def source_entries(config) -> list[OutEntry]:
    """Every tensor of the checkpoint: the model's state dict (fused experts) and the per-expert MTP head."""
    from transformers import Qwen3_5MoeForConditionalGeneration
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeDecoderLayer

    text = config.text_config
    with torch.device("meta"):
        model = Qwen3_5MoeForConditionalGeneration(config).to(torch.bfloat16)
        mtp_layer = Qwen3_5MoeDecoderLayer(text, layer_idx=text.layer_types.index("full_attention")).to(torch.bfloat16)
    entries = [OutEntry(n, DTYPE_NAMES[t.dtype], tuple(t.shape)) for n, t in model.state_dict().items()]
    hidden, inter = text.hidden_size, text.moe_intermediate_size
    entries += [OutEntry("mtp.fc.weight", "BF16", (hidden, 2 * hidden))]
    norms = ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")
    entries += [OutEntry(f"mtp.{n}.weight", "BF16", (hidden,)) for n in norms]
    for n, t in mtp_layer.state_dict().items():
        if n.startswith("mlp.experts."):
            continue
        entries.append(OutEntry(f"mtp.layers.0.{n}", "BF16", tuple(t.shape)))
    for e in range(text.num_experts):
        for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter))):
            entries.append(OutEntry(f"mtp.layers.0.mlp.experts.{e}.{proj}.weight", "BF16", shape))
    return entries


def write_sparse(out: Path, config: dict, shards: list[tuple[str, list[OutEntry]]]) -> Path:
    """Real safetensors headers, data left as holes; plus config.json and the index."""
    out.mkdir(parents=True, exist_ok=True)
    for file_name, entries in shards:
        writer = ShardWriter(out / file_name, entries)
        writer.abort()  # nothing to write: the data stays a hole
        os.truncate(out / file_name, writer.size)
    weight_map = {e.name: f for f, entries in shards for e in entries}
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return out


def _split(entries: list[OutEntry], max_bytes: int) -> list[list[OutEntry]]:
    groups: list[list[OutEntry]] = [[]]
    for e in entries:
        if groups[-1] and sum(x.nbytes for x in groups[-1]) + e.nbytes > max_bytes:
            groups.append([])
        groups[-1].append(e)
    return groups


def build(workdir: Path) -> Path:
    """The sparse BF16 source and its sparse MXFP4 output (preset experts, as the seed's recipe)."""
    config = source_config()
    groups = _split(source_entries(config), SHARD_BYTES)
    names = [f"model.safetensors-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    src = write_sparse(workdir / "Qwen3.5-35B-A3B", config.to_dict(), list(zip(names, groups)))
    plan = make_plan(open_checkpoint(src), Selection("experts"), Rule.MSE3, parse_size("5GB"))
    return write_sparse(workdir / "Qwen3.5-35B-A3B-MXFP4", plan.output_config(),
                        [(s.file_name, s.entries) for s in plan.shards])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    args = ap.parse_args()
    t0 = time.perf_counter()
    dst = build(args.workdir)
    built = time.perf_counter() - t0
    from qstream.check.vllm import check_with_vllm

    t1 = time.perf_counter()
    report = check_with_vllm(dst)
    print(report.summary())
    apparent = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    on_disk = sum(f.stat().st_blocks * 512 for f in dst.glob("*.safetensors"))
    print(f"checkpoint: {report.tensors} tensors, {apparent / 1e9:.1f} GB apparent, {on_disk / 1e6:.1f} MB on disk; "
          f"built in {built:.1f} s; check_with_vllm {time.perf_counter() - t1:.1f} s wall (vLLM import included), "
          f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
