"""Module names as a compressed-tensors config's `ignore` and `targets` entries are matched against them.

An entry starting `re:` is `re.match`ed (anchored at the start only), any other entry must equal the
name. vLLM looks a module up under its own merged name too (q/k/v -> qkv_proj, gate/up -> gate_up_proj,
...), so a config that names modules must be read, and written, with the merges in mind. Shared by the
planner (which writes `ignore`/`targets`) and the FP8 input reader (which finds a source module's group).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")

# Shard name -> the merged module vLLM builds from it.
MERGES: dict[str, str] = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "in_proj_qkv": "in_proj_qkvz",
    "in_proj_z": "in_proj_qkvz",
    "in_proj_b": "in_proj_ba",
    "in_proj_a": "in_proj_ba",
    "q_a_proj": "fused_qkv_a_proj",  # DeepSeek-V2/V3 MLA
    "kv_a_proj_with_mqa": "fused_qkv_a_proj",
}


def merged_name(module: str) -> str:
    """The module vLLM merges `module` into (`...self_attn.q_proj` -> `...self_attn.qkv_proj`), else itself."""
    parent, _, leaf = module.rpartition(".")
    if leaf not in MERGES:
        return module
    return f"{parent}.{MERGES[leaf]}" if parent else MERGES[leaf]


def expert_zero(module: str) -> str:
    """The name vLLM looks a routed expert's layer up under, expert 0's (`...experts.5.w1` -> `...experts.0.w1`):
    it takes every expert's scheme from expert 0's, so a config names only that one. Any other module: itself."""
    return _EXPERT_INDEX.sub(".experts.0.", module)


def matches(entries: Iterable[str], name: str) -> bool:
    """vLLM's rule: `re:` entries are re.match'ed, others compared for equality."""
    return any(re.match(e[3:], name) if e.startswith("re:") else e == name for e in entries)
