"""Run one checkpoint in vLLM on this machine's CPU and write what it computed as JSON (one engine per process).

    python -m tests_vllm.run_vllm MODEL OUT.json --prompt-ids IDS.json [--cpu-standins]   # prompt logprobs
    python -m tests_vllm.run_vllm MODEL OUT.json --prompts TEXT.json --max-tokens 32   # greedy text

Prompt logprobs cover the whole vocabulary at every position, as vLLM computes them (float32).
`--cpu-standins` installs the test-only MXFP4, FP8 and MXFP8 stand-ins (tests_vllm/mxfp4_cpu.py, fp8_cpu.py) first.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt-ids", type=Path, help="JSON list of token-id lists: write their prompt logprobs")
    group.add_argument("--prompts", type=Path, help="JSON list of strings: write their greedy continuations")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cpu-standins", action="store_true")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # keep the engine (and our patches) in this process
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # vLLM torch.compiles its logprob ranking: 10 s per process on CPU
    if args.cpu_standins:
        from tests_vllm import fp8_cpu, mxfp4_cpu

        mxfp4_cpu.install()
        fp8_cpu.install()
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(args.model), dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0, max_num_seqs=8,
        skip_tokenizer_init=args.prompt_ids is not None,  # the tiny fixtures have no tokenizer
        gpu_memory_utilization=0.05,  # on CPU: the share of RAM vLLM reserves (0.92 by default)
        max_logprobs=-1,  # prompt logprobs over the whole vocabulary
        language_model_only=True,  # text only: Qwen3.5's vision processor would need a tokenizer
    )
    if args.prompt_ids is not None:
        prompts = [{"prompt_token_ids": ids} for ids in json.loads(args.prompt_ids.read_text())]
        outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=-1, detokenize=False))
        result = [
            [None if pos is None else {str(t): lp.logprob for t, lp in sorted(pos.items())}
             for pos in o.prompt_logprobs]
            for o in outs
        ]
    else:
        greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)
        outs = llm.generate(json.loads(args.prompts.read_text()), greedy)
        result = [o.outputs[0].text for o in outs]
    args.out.write_text(json.dumps(result))
    os._exit(0)  # skip the engine's teardown (seconds of it); everything needed is written


if __name__ == "__main__":
    main()
