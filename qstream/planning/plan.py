"""Plan a conversion from headers alone: every output tensor, its shard, and the config.

The plan is built and validated whole before any data moves, so a bad selection or
an odd tensor fails in a second, not after an hour; `qstream plan` prints it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Generic, Protocol, TypeVar

from qstream.errors import QstreamError
from qstream.format.formats import (
    BF16,
    FLOAT_DTYPES,
    KEPT_FP8_DTYPES,
    MIXED_PRECISION,
    MXFP4,
    MXFP4_FORMAT,
    scheme_format,
)
from qstream.format.mxfp4 import BLOCK
from qstream.format.rules import Rule
from qstream.io.checkpoint import Checkpoint, CheckpointTensor, SourceTensor
from qstream.io.safetensors_io import OutEntry
from qstream.io.source_formats import DecodedTensor, PackedExperts, decode_checkpoint
from qstream.planning.selection import (
    KEEP_DTYPES,
    PRESETS,
    Decision,
    Role,
    Selection,
    decide,
    is_linear_weight,
    presets_selecting,
    region_of,
    role_of,
)
from qstream.planning.targets import Module, build_cover, build_ignore, targeting_problems

COMPRESSED_TENSORS_VERSION = "0.20.0"  # the decoder our output is checked against
MXFP4_GROUP = {"format": MXFP4_FORMAT.ct_format, "weights": MXFP4_FORMAT.weights, "input_activations": None,
               "output_activations": None}

# model_type -> names of (gate, up, down) when fused experts are split per expert.
EXPERT_PROJ_NAMES: dict[str, tuple[str, str, str]] = {"mixtral": ("w1", "w3", "w2")}
DEFAULT_EXPERT_PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")
FUSED_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class QuantJob:
    """One output module: rows row_start, row_start + row_step, ... < row_end of a source seen as [-1, in]."""

    module: str
    source: CheckpointTensor
    row_start: int
    row_end: int
    row_step: int = 1

    @property
    def rows(self) -> int:
        return len(range(self.row_start, self.row_end, self.row_step))

    @property
    def in_features(self) -> int:
        return self.source.info.shape[-1]

    @cached_property
    def entries(self) -> tuple[OutEntry, ...]:  # cached: the pipeline asks per chunk
        rows, n, f = self.rows, self.in_features, MXFP4_FORMAT
        return (
            OutEntry(self.module + f.weight_suffix, f.weight_dtypes[0], (rows, f.stored_width(n))),
            OutEntry(self.module + f.scale_suffix, f.scale_dtypes[0], (rows, n // BLOCK)),
        )

    @property
    def bytes_in(self) -> int:
        return self.rows * self.in_features * self.source.info.nbytes // max(1, self.source.info.numel)


@dataclass(frozen=True)
class CopyJob:
    """A source tensor carried over byte for byte (a decoded one: as its BF16 values), under its own name."""

    source: CheckpointTensor

    @property
    def entries(self) -> tuple[OutEntry, ...]:
        i = self.source.info
        return (OutEntry(i.name, i.dtype, i.shape),)

    @property
    def bytes_in(self) -> int:
        return self.source.info.nbytes


Job = QuantJob | CopyJob


class Writes(Protocol):
    """A job of any command that writes shards: the output tensors it fills."""

    @property
    def entries(self) -> tuple[OutEntry, ...]: ...


J = TypeVar("J", bound=Writes, covariant=True)


@dataclass(frozen=True)
class Shard(Generic[J]):
    """One output file and the jobs that fill it, in order."""

    file_name: str
    jobs: tuple[J, ...]

    @property
    def entries(self) -> list[OutEntry]:
        return [e for job in self.jobs for e in job.entries]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


@dataclass(frozen=True)
class Plan:
    source: Checkpoint[CheckpointTensor]  # as decoded: FP8 weights as the BF16 tensors they encode
    selection: Selection
    rule: Rule
    decisions: dict[str, Decision]
    shards: tuple[Shard[Job], ...]
    modules: tuple[Module, ...]
    ignore: tuple[str, ...]
    kept_schemes: tuple[tuple[str, dict], ...] = ()  # (format, config group) of source-quantized modules kept
    keep_dtype: str = "source"

    @cached_property
    def quantized_sources(self) -> list[str]:
        return [n for n, d in self.decisions.items() if d.quantize]

    @property
    def bytes_in(self) -> int:
        """Bytes of the source checkpoint's tensors (an FP8 weight: its bytes and scales, not its decoding)."""
        return sum(source_nbytes(t) for t in self.source.tensors.values())

    @property
    def work_bytes(self) -> int:
        """What the progress bar counts: source bytes as the jobs read them (decoded weights at BF16 size)."""
        return sum(j.bytes_in for s in self.shards for j in s.jobs)

    @property
    def bytes_out(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def quantization_config(self) -> dict:
        """The compressed-tensors block vLLM reads: MXFP4 weights in groups of BLOCK with uint8 E8M0 scales.

        With kept FP8/MXFP8 modules it is mixed precision: every group then names its modules (the
        MXFP4 one no longer targets the class `Linear`), so no reader's precedence rules matter.
        """
        groups = {"group_0": {"targets": ["Linear"], **MXFP4_GROUP}}
        if self.kept_schemes:
            groups = {"group_0": {"targets": build_cover(list(self.modules), MXFP4), **MXFP4_GROUP}}
            for i, (fmt, scheme) in enumerate(self.kept_schemes, 1):
                groups[f"group_{i}"] = {"targets": build_cover(list(self.modules), fmt), **scheme}
        return {
            "quant_method": "compressed-tensors",
            "format": MIXED_PRECISION if self.kept_schemes else MXFP4_FORMAT.ct_format,
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": list(self.ignore),
            "kv_cache_scheme": None,
            "version": COMPRESSED_TENSORS_VERSION,
        }

    def output_config(self) -> dict:
        config = dict(self.source.config)
        config["quantization_config"] = self.quantization_config()
        return config


def source_nbytes(t: CheckpointTensor) -> int:
    """Bytes the source spends on it: a kept-precision weight's stored tensors (weight and scales), else its own."""
    return sum(s.info.nbytes for s in t.stored) if t.stored else t.info.nbytes


def quant_jobs(ckpt: Checkpoint[CheckpointTensor], t: CheckpointTensor) -> list[QuantJob]:
    """Split a selected tensor into output modules (fused experts: one per expert and projection)."""
    shape = t.info.shape
    if len(shape) == 2:
        return [QuantJob(t.name.removesuffix(".weight"), t, 0, shape[0])]
    fused = FUSED_EXPERT.match(t.name)
    if not fused:
        raise QstreamError(f"{t.name}: 3-D tensor that is not a fused expert tensor; exclude it")
    gate, up, down = EXPERT_PROJ_NAMES.get(ckpt.text_config.get("model_type", ""), DEFAULT_EXPERT_PROJ_NAMES)
    n_exp, out, _ = shape
    prefix = fused["prefix"]
    hidden = ckpt.text_config.get("hidden_size")
    if fused["kind"] == "down_proj":
        if hidden and out != hidden:
            raise QstreamError(f"{t.name}: shape {list(shape)} is not [experts, hidden={hidden}, intermediate]; "
                               "transposed fused experts are not supported")
        return [QuantJob(f"{prefix}.{e}.{down}", t, e * out, (e + 1) * out) for e in range(n_exp)]
    if out % 2 or (hidden and shape[2] != hidden):
        raise QstreamError(f"{t.name}: shape {list(shape)} is not [experts, 2*intermediate, hidden={hidden}]; "
                           "transposed fused experts are not supported")
    half = out // 2
    jobs = []
    for e in range(n_exp):
        if isinstance(t, PackedExperts) and t.interleaved:  # gate rows even, up rows odd (gpt-oss)
            jobs.append(QuantJob(f"{prefix}.{e}.{gate}", t, e * out, (e + 1) * out, 2))
            jobs.append(QuantJob(f"{prefix}.{e}.{up}", t, e * out + 1, (e + 1) * out, 2))
        else:
            jobs.append(QuantJob(f"{prefix}.{e}.{gate}", t, e * out, e * out + half))
            jobs.append(QuantJob(f"{prefix}.{e}.{up}", t, e * out + half, (e + 1) * out))
    return jobs


def linear_modules(weights: Iterable[tuple[str, tuple[int, ...], str]]) -> list[Module]:
    """Linear modules as vLLM sees them, from (weight name, shape, storage format); one layer's experts form
    one module. Shared by the planner (source names) and `verify` (names read back from an output)."""
    modules: dict[str, Module] = {}
    for name, shape, fmt in weights:
        if not is_linear_weight(name, shape):
            continue
        role = role_of(name)
        if role is Role.ROUTED_EXPERT:
            mod = name[: name.index(".experts.") + len(".experts")]
        else:
            mod = name.removesuffix(".weight")
        m = Module(mod, region_of(name), role, fmt)
        if mod in modules and modules[mod].fmt != m.fmt:
            raise QstreamError(
                f"{mod}: its experts would be stored as {modules[mod].fmt} and {m.fmt}; vLLM takes all experts of "
                "a layer from expert 0's scheme, so select all or none of them"
            )
        modules[mod] = m
    return list(modules.values())


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def pack_shards(jobs: Sequence[J], max_shard_bytes: int) -> tuple[Shard[J], ...]:
    """Jobs in order into files of at most max_shard_bytes (a job larger than that gets a file of its own)."""
    groups: list[list[J]] = [[]]
    size = 0
    for job in jobs:
        n = sum(e.nbytes for e in job.entries)
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += n
    return tuple(Shard(shard_name(i, len(groups)), tuple(g)) for i, g in enumerate(groups))


def make_plan(source: Checkpoint[SourceTensor], selection: Selection, rule: Rule, max_shard_bytes: int,
              keep_dtype: str = "source", allow_empty: bool = False) -> Plan:
    """Decide every tensor, split fused experts, pack shards, build and check the ignore list and targets.

    `keep_dtype` says what an FP8/MXFP8 source weight that is not quantized becomes: "source" keeps its
    bytes and scales (a mixed-precision output), "bf16" writes its decoded values. A selection that
    quantizes nothing is an error unless `allow_empty` (`qstream plan` shows such a plan and says why).
    """
    if keep_dtype not in KEEP_DTYPES:
        raise QstreamError(f"keep dtype {keep_dtype!r} not understood; choose one of {', '.join(KEEP_DTYPES)}")
    ckpt = decode_checkpoint(source)
    decisions = {name: decide(name, t.info.shape, selection) for name, t in ckpt.tensors.items()}
    if not allow_empty and not any(d.quantize for d in decisions.values()):
        raise QstreamError(f"{ckpt.root}: {nothing_selected(ckpt, selection)}")
    jobs: list[Job] = []
    formats: dict[str, str] = {}  # source weight -> how the output stores it
    kept: dict[str, dict] = {}  # format -> config group of the kept source-quantized modules
    for name, t in ckpt.tensors.items():
        formats[name] = MXFP4 if decisions[name].quantize else BF16
        if isinstance(t, PackedExperts) and not decisions[name].quantize:
            raise QstreamError(f"{name}: already MXFP4 in the source (gpt-oss); it is converted losslessly "
                               "and cannot be kept or excluded")
        if decisions[name].quantize:
            if t.info.dtype not in FLOAT_DTYPES and not isinstance(t, PackedExperts):
                raise QstreamError(f"{name}: dtype {t.info.dtype} cannot be quantized (expected one of {FLOAT_DTYPES})")
            jobs.extend(quant_jobs(ckpt, t))
        elif isinstance(t, DecodedTensor) and keep_dtype == "source":
            formats[name] = _kept_format(t, kept)
            jobs.extend(CopyJob(s) for s in t.stored)
        else:
            jobs.append(CopyJob(t))
    names = [e.name for j in jobs for e in j.entries]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise QstreamError(f"{ckpt.root}: output tensor {dup!r} would be written twice (fused and per-expert experts?)")
    modules = linear_modules((n, t.info.shape, formats[n]) for n, t in ckpt.tensors.items())
    plan = Plan(ckpt, selection, rule, decisions, pack_shards(jobs, max_shard_bytes), tuple(modules),
                tuple(build_ignore(modules)), tuple(kept.items()), keep_dtype)
    problems = targeting_problems(plan.quantization_config(), modules)
    if problems:  # build_cover is meant to make this impossible: a bug, not a user error
        raise RuntimeError(f"ignore list and targets do not fit the checkpoint: {problems[:3]}")
    return plan


def nothing_selected(ckpt: Checkpoint[CheckpointTensor], selection: Selection) -> str:
    """Why `selection` quantizes no tensor of ckpt, and which option would."""
    pairs = PRESETS[selection.preset][1]
    if any((region_of(n), role_of(n)) in pairs for n in ckpt.tensors):
        return (f"nothing to quantize: --exclude or --skip-indivisible keep every tensor preset {selection.preset} "
                "selects; loosen them")
    roles = sorted({role.value.replace("_", " ") + "s" for _, role in pairs})
    fits = [p for p in presets_selecting(ckpt.tensors) if p != selection.preset]
    use = " or ".join(f"--preset {p}" for p in fits) if fits else "--include GLOB"
    also = f" and --include {' '.join(selection.include)} matches none" if selection.include else ""
    return f"nothing to quantize: no {', '.join(roles)} found (preset {selection.preset}){also}; use {use}"


def _kept_format(t: DecodedTensor, kept: dict[str, dict]) -> str:
    """The format a source-quantized weight keeps; one config group per format, so schemes must agree."""
    if t.weight.info.dtype not in KEPT_FP8_DTYPES:
        raise QstreamError(f"{t.name}: {t.weight.info.dtype} has no compressed-tensors scheme vLLM reads; "
                           "pass --keep-dtype bf16 to write the unquantized tensors as BF16")
    fmt = scheme_format(t.scheme)
    if kept.setdefault(fmt, t.scheme) != t.scheme:
        raise QstreamError(f"{t.name}: kept {fmt} weights of the source use two schemes ({kept[fmt]} and "
                           f"{t.scheme}), which one output config group cannot describe; pass --keep-dtype bf16")
    return fmt


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2^20, plain integers are bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise QstreamError(f"size {text!r} not understood; write e.g. 5GB, 500MiB or a number of bytes")
    num, unit, binary = float(m[1]), m[2].upper(), bool(m[3])
    power = "KMGT".find(unit) + 1 if unit else 0
    return int(num * (1024 if binary else 1000) ** power)


def estimate_bits_per_weight(plan: Plan) -> float:
    """Average stored bits per quantized parameter (4 + 8/32 for MXFP4)."""
    q = [j for s in plan.shards for j in s.jobs if isinstance(j, QuantJob)]
    params = sum(j.rows * j.in_features for j in q)
    stored = sum(e.nbytes for j in q for e in j.entries)
    return 8 * stored / params if params else math.nan
