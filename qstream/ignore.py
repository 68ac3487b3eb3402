"""The compressed-tensors `ignore` list, built and checked the way vLLM matches it.

vLLM decides per module whether it is quantized: an entry starting `re:` is
`re.match`ed (anchored at the start only), any other entry must equal the name.
It matches its own module names: q/k/v merged into qkv_proj, gate/up into
gate_up_proj, Qwen3.5's in_proj_qkv/z and in_proj_b/a merged, prefixes renamed,
and MoE experts probed as `<layer>.experts.0.<gate proj>`. A BF16 Linear that no
entry matches loads as zeros, so every name a module may be looked up under must
be covered; a quantized module must be matched by none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from qstream.errors import QstreamError
from qstream.selection import Region, Role

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
}

# HF prefix -> vLLM prefix: hf_to_vllm_mapper of the Qwen3-VL-style multimodal classes,
# then of the text-only Qwen3.5 classes. vLLM does not rewrite `re:` entries with them.
PREFIX_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("lm_head.", "language_model.lm_head."),
)

# Names vLLM probes to choose an MoE layer's scheme, for each expert naming style.
EXPERT_PROBES = ("0.gate_proj", "0.up_proj", "0.down_proj", "0.w1", "0.w2", "0.w3")

# Coarse ignore entries, tried before per-module ones (data, not code paths).
REGION_ENTRIES: dict[Region, str] = {
    Region.VISUAL: r"re:(?:.*\.)?(?:visual|vision_tower|vision_model|multi_modal_projector)\..*",
    Region.MTP: r"re:(?:.*\.)?mtp\..*",
}
ROLE_ENTRIES: dict[Role, str] = {
    Role.ATTENTION: r"re:.*\.self_attn\..*",
    Role.LINEAR_ATTENTION: r"re:.*\.linear_attn\..*",
    Role.SHARED_EXPERT: r"re:.*\.shared_experts?\..*",
    Role.SHARED_EXPERT_GATE: r"re:.*\.shared_expert_gate$",
    Role.ROUTER: r"re:.*\.(?:mlp|block_sparse_moe)\.(?:gate|router)$",
    Role.DENSE_MLP: r"re:.*\.mlp\.(?:gate_proj|up_proj|down_proj|gate_up_proj)$",
    Role.LM_HEAD: r"re:(?:.*\.)?lm_head$",
    Role.ROUTED_EXPERT: r"re:.*\.experts\..*",
}


@dataclass(frozen=True)
class Module:
    """A Linear (or one layer's experts, named `<layer>.experts`) and whether it is quantized."""

    name: str
    region: Region
    role: Role
    quantized: bool


def variants(module: Module) -> tuple[str, ...]:
    """Every name vLLM may look this module up under."""
    if module.role is Role.ROUTED_EXPERT:
        names = [f"{module.name}.{probe}" for probe in EXPERT_PROBES]
    else:
        parent, _, leaf = module.name.rpartition(".")
        names = [module.name]
        if leaf in MERGES:
            names.append(f"{parent}.{MERGES[leaf]}" if parent else MERGES[leaf])
    renamed = [new + n[len(old) :] for n in names for old, new in PREFIX_RENAMES if n.startswith(old)]
    return tuple(dict.fromkeys(names + renamed))


def matches(entries: Iterable[str], name: str) -> bool:
    """vLLM's rule: `re:` entries are re.match'ed, others compared for equality."""
    return any(re.match(e[3:], name) if e.startswith("re:") else e == name for e in entries)


def _exact_entry(module: Module) -> str:
    return "re:(?:" + "|".join(re.escape(v) for v in variants(module)) + ")$"


def build_ignore(modules: list[Module]) -> list[str]:
    """The shortest-reading ignore list: coarse entries where they hit no quantized module."""
    check_merges(modules)
    quantized_names = [v for m in modules if m.quantized for v in variants(m)]
    entries: list[str] = []
    for m in modules:
        if m.quantized or all(matches(entries, v) for v in variants(m)):
            continue
        coarse = [REGION_ENTRIES.get(m.region), ROLE_ENTRIES.get(m.role)]
        entry = next(
            (e for e in coarse if e and not any(matches([e], q) for q in quantized_names)),
            _exact_entry(m),
        )
        entries.append(entry)
    return entries


def check_merges(modules: list[Module]) -> None:
    """vLLM merges q/k/v (and the like) into one module: its parts must agree on precision."""
    groups: dict[str, set[bool]] = {}
    for m in modules:
        parent, _, leaf = m.name.rpartition(".")
        if leaf in MERGES and m.role is not Role.ROUTED_EXPERT:
            groups.setdefault(f"{parent}.{MERGES[leaf]}", set()).add(m.quantized)
    mixed = [g for g, states in groups.items() if len(states) > 1]
    if mixed:
        raise QstreamError(
            f"{mixed[0]}: vLLM loads its parts as one module, but the selection quantizes only some of them; "
            "include or exclude all of its parts"
        )


def ignore_problems(entries: list[str], modules: list[Module]) -> list[str]:
    """Every way the ignore list disagrees with what is on disk, as vLLM would see it."""
    problems = []
    for m in modules:
        for v in variants(m):
            hit = matches(entries, v)
            if m.quantized and hit:
                problems.append(f"{v}: quantized on disk but matched by ignore (vLLM would load it as BF16)")
            elif not m.quantized and not hit:
                problems.append(f"{v}: BF16 on disk but not ignored (vLLM would load it as zeros)")
    return problems
