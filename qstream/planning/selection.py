"""Which tensors become MXFP4: tensor names classified by tables, presets and globs.

Every tensor gets a region (language, visual, mtp) from its prefix and a role
(attention, routed_expert, router, ...) from its suffix. Presets are sets of
(region, role) pairs; --include/--exclude globs adjust the result. No numerics, no I/O.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from qstream.errors import QstreamError
from qstream.format.rules import BLOCK


class Region(str, enum.Enum):
    LANGUAGE = "language"
    VISUAL = "visual"
    MTP = "mtp"


class Role(str, enum.Enum):
    ROUTED_EXPERT = "routed_expert"
    SHARED_EXPERT = "shared_expert"
    DENSE_MLP = "dense_mlp"
    ROUTER = "router"
    SHARED_EXPERT_GATE = "shared_expert_gate"
    ATTENTION = "attention"
    LINEAR_ATTENTION = "linear_attention"
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    OTHER = "other"


# First match wins. Searched (re.search) in the full tensor name.
REGIONS: tuple[tuple[Region, re.Pattern[str]], ...] = (
    (Region.VISUAL, re.compile(r"(?:^|\.)(?:visual|vision_tower|vision_model|multi_modal_projector)\.")),
    (Region.MTP, re.compile(r"(?:^|\.)mtp\.")),
)

_EXPERT_PROJ = r"(?:gate_proj|up_proj|down_proj|w1|w2|w3)"
ROLES: tuple[tuple[Role, re.Pattern[str]], ...] = (
    (Role.ROUTED_EXPERT, re.compile(rf"\.experts\.\d+\.{_EXPERT_PROJ}\.weight$")),
    (Role.ROUTED_EXPERT, re.compile(r"\.experts\.(?:gate_up_proj|down_proj)$")),
    (Role.SHARED_EXPERT_GATE, re.compile(r"\.shared_expert_gate\.weight$")),
    (Role.SHARED_EXPERT, re.compile(r"\.shared_experts?\.(?:gate_proj|up_proj|down_proj)\.weight$")),
    (Role.ROUTER, re.compile(r"\.(?:mlp|block_sparse_moe)\.(?:gate|router)\.weight$")),
    (Role.DENSE_MLP, re.compile(r"\.mlp\.(?:gate_proj|up_proj|down_proj)\.weight$")),
    (Role.ATTENTION, re.compile(r"\.(?:self_attn|attn)\.(?:q_proj|k_proj|v_proj|o_proj|qkv|proj"
                                r"|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)\.weight$")),  # + DeepSeek's MLA
    (Role.LINEAR_ATTENTION, re.compile(r"\.linear_attn\.(?:in_proj_\w+|out_proj)\.weight$")),
    (Role.EMBEDDING, re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings)\.weight$")),
    (Role.LM_HEAD, re.compile(r"(?:^|\.)lm_head\.weight$")),
)

PRESETS: dict[str, tuple[str, frozenset[tuple[Region, Role]]]] = {
    "experts": (
        "routed MoE experts only (the reference model card's recipe)",
        frozenset({(Region.LANGUAGE, Role.ROUTED_EXPERT)}),
    ),
    "mlp": (
        "routed experts, shared experts and dense MLPs (use for dense models)",
        frozenset((Region.LANGUAGE, r) for r in (Role.ROUTED_EXPERT, Role.SHARED_EXPERT, Role.DENSE_MLP)),
    ),
    "all-linear": (
        "every language-model Linear but routers, gates, embeddings and lm_head",
        frozenset(
            (Region.LANGUAGE, r)
            for r in (Role.ROUTED_EXPERT, Role.SHARED_EXPERT, Role.DENSE_MLP, Role.ATTENTION, Role.LINEAR_ATTENTION)
        ),
    ),
}
DEFAULT_PRESET = "experts"
# What a selected-out FP8/MXFP8 source weight becomes: its source bytes and scales, or decoded BF16.
KEEP_DTYPES = ("source", "bf16")

# Roles vLLM always builds unquantized: selecting them would load garbage.
NEVER_QUANTIZED = frozenset({Role.ROUTER, Role.SHARED_EXPERT_GATE, Role.EMBEDDING})


def region_of(name: str) -> Region:
    return next((region for region, pat in REGIONS if pat.search(name)), Region.LANGUAGE)


def role_of(name: str) -> Role:
    return next((role for role, pat in ROLES if pat.search(name)), Role.OTHER)


def presets_selecting(names: Iterable[str]) -> list[str]:
    """The presets that select at least one of these tensors by region and role (before any glob)."""
    found = {(region_of(n), role_of(n)) for n in names}
    return [p for p, (_, pairs) in PRESETS.items() if found & pairs]


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A weight vLLM builds as a Linear (or MoE experts) that the ignore list must account for."""
    role = role_of(name)
    if role is Role.ROUTED_EXPERT:
        return True
    return len(shape) == 2 and name.endswith(".weight") and role is not Role.EMBEDDING


@dataclass(frozen=True)
class Selection:
    """The user's choice: a preset plus globs, and what to do with indivisible tensors."""

    preset: str = DEFAULT_PRESET
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_indivisible: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise QstreamError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")


@dataclass(frozen=True)
class Decision:
    name: str
    quantize: bool
    reason: str  # why: "preset experts", "--include 'x'", "1-D", "in_features 100 not a multiple of 32", ...


def decide(name: str, shape: tuple[int, ...], sel: Selection) -> Decision:
    """Quantize or keep one tensor, with the reason a person would want in the plan."""
    region, role = region_of(name), role_of(name)
    by_preset = (region, role) in PRESETS[sel.preset][1]
    included = next((g for g in sel.include if fnmatch.fnmatchcase(name, g)), None)
    excluded = next((g for g in sel.exclude if fnmatch.fnmatchcase(name, g)), None)
    if excluded is not None:
        return Decision(name, False, f"--exclude {excluded!r}")
    if not (by_preset or included is not None):
        return Decision(name, False, f"{region.value} {role.value}")
    why = f"--include {included!r}" if included is not None else f"preset {sel.preset}"
    if role in NEVER_QUANTIZED:
        raise QstreamError(f"{name}: selected by {why}, but vLLM builds {role.value} layers unquantized; exclude it")
    if len(shape) not in (2, 3) or (len(shape) == 3 and role is not Role.ROUTED_EXPERT):
        raise QstreamError(f"{name}: selected by {why}, but shape {list(shape)} is not a Linear weight; exclude it")
    if shape[-1] % BLOCK:
        if sel.skip_indivisible:
            return Decision(name, False, f"in_features {shape[-1]} not a multiple of {BLOCK} (--skip-indivisible)")
        raise QstreamError(
            f"{name}: in_features {shape[-1]} is not a multiple of {BLOCK}, so it has no MXFP4 blocks; "
            "exclude it or pass --skip-indivisible to keep it in BF16"
        )
    return Decision(name, True, why)
