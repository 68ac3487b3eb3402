"""llm-compressor's `oneshot` GPTQ with its MXFP4A16 scheme on SRC -> DST, on calibration token ids given.

The peer side of issue 14's comparison: it runs inside llm-compressor's own virtualenv (it pins other
transformers/torch versions than qstream), on CPU, and is fed exactly the tokens qstream calibrates on,
saved once by qstream's own code, so that both tools see the same 128 x 512 tokens:

    # qstream's venv, from the repository root: the last 128 x 512 tokens of the offline Wikipedia corpus
    python -c "import torch; from qstream import assets; from qstream.calib.calibrate import calibration_ids; \
from qstream.io.text_sources import wikipedia; src = assets.build_smollm2_dense(assets.cache_dir() / 'smollm2-135m'); \
torch.save(calibration_ids(src, wikipedia(), 128, 512)[0].reshape(128, 512), 'calib.pt')"
    # llm-compressor's venv V: python3 -m venv V && V/bin/pip install torch==2.13.0 (the CPU build)
    #                          && V/bin/pip install llmcompressor==0.14.0.1
    /usr/bin/time -v V/bin/python bench/peer_llmcompressor_gptq.py SRC calib.pt DST --modules mlp --json run.json

`--modules mlp` quantizes every mlp.{gate,up,down}_proj (qstream's `--preset mlp` on a dense model);
`--modules experts` the routed experts only (qstream's `experts` preset on the Mixtral-style MoE). On an MoE,
`oneshot` first splits transformers' fused experts into per-expert Linear modules (its own post-load
`linearize_moe`, which knows Mixtral); `--expert-tokens routed` gives each expert's Hessian only the tokens the
router sends it, as qstream's gptq does (`all`, llm-compressor's default, runs every expert on every token).
GPTQ as the issue's anchor: static act-order, block 128, dampening 0.01, sequential pipeline with the quantized
outputs propagated (llm-compressor's defaults for these). DST is written with save_compressed=True
(compressed-tensors mxfp4-pack-quantized); the wall time, peak RSS, versions and settings go to --json.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

# Regexes on module names, matched by compressed-tensors; everything else stays in the source dtype.
TARGETS = {
    "mlp": [r"re:.*mlp\.(gate|up|down)_proj$"],
    "experts": [r"re:.*experts\.\d+\.(gate|up|down)_proj$", r"re:.*experts\.\d+\.w[123]$"],
}
SETTINGS = {"scheme": "MXFP4A16", "actorder": "static", "block_size": 128, "dampening_frac": 0.01}


def _vm_hwm() -> int:
    """This process's peak resident memory (VmHWM): ru_maxrss would carry over the peak of the process that
    started this one."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("ids", type=Path, help="a [samples, seq_len] int64 tensor saved with torch.save")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--modules", choices=sorted(TARGETS), default="mlp")
    ap.add_argument("--expert-tokens", choices=["routed", "all"], default="routed")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    ids = torch.load(args.ids)
    samples, seq_len = ids.shape
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(args.src)
    recipe = GPTQModifier(targets=TARGETS[args.modules], ignore=["lm_head"], **SETTINGS)
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe, num_calibration_samples=samples,
            max_seq_length=seq_len, shuffle_calibration_samples=False,
            moe_calibrate_all_experts=args.expert_tokens == "all")
    model.save_pretrained(args.dst, save_compressed=True)
    tokenizer.save_pretrained(args.dst)
    seconds = time.perf_counter() - t0
    versions = {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets")}
    out = {"seconds": seconds, "peak_rss_bytes": _vm_hwm(),
           "versions": versions, "threads": torch.get_num_threads(),
           "settings": {**SETTINGS, "targets": TARGETS[args.modules], "ignore": ["lm_head"], "samples": samples,
                        "seq_len": seq_len, "model_dtype": str(model.dtype), "device": "cpu",
                        "pipeline": "oneshot default (sequential for GPTQ)", "shuffle_calibration_samples": False,
                        "expert_tokens": args.expert_tokens}}
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
