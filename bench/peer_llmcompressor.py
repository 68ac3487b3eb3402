"""Run llm-compressor's model_free_ptq (MXFP4A16) on SRC -> DST, quantizing only the routed experts.

Runs inside llm-compressor's own virtualenv (it pins other versions than qstream); bench_quantize.py
starts it as a child process and measures its wall time and peak RSS.
"""

import sys

from llmcompressor import model_free_ptq

# Everything but the routed experts stays bf16, as qstream's default `experts` preset does.
IGNORE = [
    "lm_head", "re:.*embed_tokens.*", "re:.*self_attn.*", "re:.*linear_attn.*",
    "re:.*shared_expert.*", "re:.*mlp\\.gate$", "re:.*visual.*", "re:.*mtp.*",
]

if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    model_free_ptq(model_stub=src, save_directory=dst, scheme="MXFP4A16", ignore=IGNORE, max_workers=1, device="cpu")
