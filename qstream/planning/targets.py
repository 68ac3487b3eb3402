"""The compressed-tensors `ignore` list and group `targets`, built and checked the way vLLM matches them.

vLLM decides per module how it is stored: `ignore` first (BF16), then the first config
group with a target naming the module, then a group targeting the class `Linear`. An
entry starting `re:` is `re.match`ed (anchored at the start only), any other entry must
equal the name. vLLM matches its own module names: q/k/v merged into qkv_proj, gate/up
into gate_up_proj, Qwen3.5's in_proj_qkv/z and in_proj_b/a merged, prefixes renamed,
and MoE experts probed as `<layer>.experts.0.<gate proj>`. A BF16 Linear that resolves
to a quantized group loads as zeros, so every name a module may be looked up under must
resolve to the format it is stored in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qstream.errors import QstreamError
from qstream.format.formats import BF16, MXFP4, scheme_format
from qstream.format.names import MERGES, matches, merged_name
from qstream.planning.selection import Region, Role

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
    """A Linear (or one layer's experts, named `<layer>.experts`) and the format it is stored in."""

    name: str
    region: Region
    role: Role
    fmt: str  # BF16, MXFP4, FP8, MXFP8

    @property
    def quantized(self) -> bool:
        return self.fmt != BF16


def variants(module: Module) -> tuple[str, ...]:
    """Every name vLLM may look this module up under."""
    if module.role is Role.ROUTED_EXPERT:
        names = [f"{module.name}.{probe}" for probe in EXPERT_PROBES]
    else:
        names = list(dict.fromkeys([module.name, merged_name(module.name)]))
    renamed = [new + n[len(old) :] for n in names for old, new in PREFIX_RENAMES if n.startswith(old)]
    return tuple(dict.fromkeys(names + renamed))


def _exact_entry(module: Module) -> str:
    return "re:(?:" + "|".join(re.escape(v) for v in variants(module)) + ")$"


def build_cover(modules: list[Module], fmt: str) -> list[str]:
    """The shortest-reading entries matching every name of the modules stored as `fmt` and no name of any
    other module: coarse entries where they hit no other module, exact alternatives elsewhere."""
    check_merges(modules)
    others = [v for m in modules if m.fmt != fmt for v in variants(m)]
    mine = [m for m in modules if m.fmt == fmt]
    entries: list[str] = []
    for m in mine:  # coarse entries first, so exact ones are written only for what they leave out
        if all(matches(entries, v) for v in variants(m)):
            continue
        for e in (REGION_ENTRIES.get(m.region), ROLE_ENTRIES.get(m.role)):
            if e and e not in entries and not any(matches([e], q) for q in others):
                entries.append(e)
                break
    for m in mine:
        if not all(matches(entries, v) for v in variants(m)):
            entries.append(_exact_entry(m))
    return entries


def build_ignore(modules: list[Module]) -> list[str]:
    """The ignore list: every BF16 module, and nothing else."""
    return build_cover(modules, BF16)


def resolve(qc: dict, name: str) -> str:
    """The format vLLM loads module `name` as under quantization_config `qc` (the order in the module doc)."""
    if matches(qc.get("ignore") or [], name):
        return BF16
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
    for g in groups:
        if matches(g.get("targets") or [], name):
            return scheme_format(g)
    return next((scheme_format(g) for g in groups if "Linear" in (g.get("targets") or [])), BF16)


def check_merges(modules: list[Module]) -> None:
    """vLLM merges q/k/v (and the like) into one module: its parts must agree on precision."""
    groups: dict[str, set[str]] = {}
    for m in modules:
        if m.name.rpartition(".")[2] in MERGES and m.role is not Role.ROUTED_EXPERT:
            groups.setdefault(merged_name(m.name), set()).add(m.fmt)
    mixed = [g for g, states in groups.items() if len(states) > 1]
    if mixed:
        raise QstreamError(
            f"{mixed[0]}: vLLM loads its parts as one module, but the selection quantizes only some of them; "
            "include or exclude all of its parts"
        )


def targeting_problems(qc: dict, modules: list[Module]) -> list[str]:
    """Every way the config's ignore list and group targets disagree with what is on disk, as vLLM sees it."""
    problems = []
    for m in modules:
        for v in variants(m):
            got = resolve(qc, v)
            if got == m.fmt:
                continue
            if m.fmt == BF16:
                problems.append(f"{v}: BF16 on disk but not ignored (vLLM would load it as zeros)")
            elif got == BF16:
                what = "quantized" if m.fmt == MXFP4 else m.fmt
                why = "matched by ignore" if matches(qc.get("ignore") or [], v) else "targeted by no config group"
                problems.append(f"{v}: {what} on disk but {why} (vLLM would load it as BF16)")
            else:
                problems.append(f"{v}: {m.fmt} on disk but its config group is {got} (vLLM would misread it)")
    return problems
