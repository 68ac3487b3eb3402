"""Quantized inputs (FP8, MXFP8) seen as the BF16 tensors they encode, decoded on the fly.

The format is read from config.json's quantization_config, never guessed from tensor
names. Each scaled weight `X.weight` becomes one logical BF16 tensor whose rows are
decoded as they are read (weight * its block's scale, rounded once to BF16), which is
what MXFP4 quantization reads. It also carries the source tensors that store it, under
their compressed-tensors names, and the config group describing them: a tensor that
stays unquantized is written either as those (its source precision, the default) or
as the decoded BF16 (`--keep-dtype bf16`). Scales never reach the output on their own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from qstream.errors import QstreamError
from qstream.format.formats import (
    FP8_ARGS,
    FP8_BLOCK,
    FP8_CHANNEL,
    FP8_DTYPES,
    FP8_TENSOR,
    INPUT_SCALE,
    MXFP8,
    MXFP8_FORMAT,
    kept_kind,
)
from qstream.format.mxfp4 import BLOCK, dequantize
from qstream.format.names import expert_zero, matches, merged_name
from qstream.io.checkpoint import Checkpoint, CheckpointTensor, SourceTensor
from qstream.io.safetensors_io import TensorInfo, read_rows

GPT_OSS = "gpt-oss mxfp4: *_blocks/*_scales experts, converted losslessly"
_WEIGHT, _SCALE = FP8_TENSOR.weight_suffix[1:], FP8_TENSOR.scale_suffix[1:]  # compressed-tensors' names
CONSUMED_SUFFIXES = ("weight_scale_inv", "weight_scale", "input_scale", "weight_zero_point", "input_zero_point")


class _Computed:
    """A logical tensor (a CheckpointTensor) whose values are computed from source tensors: read, never
    byte-copied. Subclasses name the source tensor it is read from first (`origin`)."""

    info: TensorInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def copyable(self) -> bool:
        return False

    @property
    def origin(self) -> SourceTensor:
        raise NotImplementedError

    @property
    def file(self) -> Path:  # the file it is read from, for fingerprints and messages
        return self.origin.file


@dataclass(frozen=True)
class DecodedTensor(_Computed):
    """A BF16 tensor computed from a low-precision weight and its per-block scales."""

    info: TensorInfo  # the logical tensor: name, "BF16", shape (offsets unused)
    weight: SourceTensor
    scale: SourceTensor
    block: tuple[int, int]  # rows and columns sharing one scale
    scale_decode: Callable[[torch.Tensor], torch.Tensor]
    stored: tuple[SourceTensor, ...]  # source tensors that keep it as is, under their output names
    scheme: dict  # compressed-tensors config group (no targets) describing `stored`

    @property
    def origin(self) -> SourceTensor:
        return self.weight

    def read_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) as BF16: weight * scale of its (row block, column block), multiplied in float32.

        The scales are broadcast over column blocks in place rather than expanded to the weight's size,
        so a chunk costs its float32 copy and its BF16 result, nothing more.
        """
        bo, bi = self.block
        w = read_rows(self.weight.file, self.weight.info, r0, r1).float()
        s0, s1 = r0 // bo, (r1 - 1) // bo + 1
        s = self.scale_decode(read_rows(self.scale.file, self.scale.info, s0, s1).reshape(s1 - s0, -1))
        s = s.repeat_interleave(bo, 0)[r0 - s0 * bo : r1 - s0 * bo]  # [rows, column blocks]: small
        rows, cols = w.shape
        full = cols // bi * bi
        w[:, :full].view(rows, -1, bi).mul_(s[:, : full // bi, None])
        if full < cols:  # a ragged last column block
            w[:, full:].mul_(s[:, full // bi : full // bi + 1])
        return w.to(torch.bfloat16)


@dataclass(frozen=True)
class PackedExperts(_Computed):
    """gpt-oss's fused MXFP4 experts, `<kind>_blocks` [E, rows, in/32, 16] + `<kind>_scales` [E, rows, in/32].

    The bytes already are compressed-tensors' layout (even column in the low nibble, E8M0
    scales), so conversion is a lossless copy of rows; gate/up rows alternate (gate even).
    """

    info: TensorInfo  # logical fused tensor `<prefix>.experts.<kind>`, shape [E, rows, in]
    blocks: SourceTensor
    scales: SourceTensor
    interleaved: bool

    @property
    def origin(self) -> SourceTensor:
        return self.blocks

    @property
    def stored(self) -> tuple[SourceTensor, ...]:
        return ()  # always quantized (losslessly), never kept

    def read_packed(self, r0: int, r1: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed [n, in/2], scales [n, in/32]) of logical rows r0, r0+step, ... < r1 (rows over all experts)."""
        g = self.scales.info.shape[-1]
        blocks = read_rows(self.blocks.file, self.blocks.info, r0 * g, r1 * g).reshape(r1 - r0, -1)
        scales = read_rows(self.scales.file, self.scales.info, r0, r1)
        return blocks[::step].contiguous(), scales[::step].contiguous()

    def read_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) as the BF16 values the codes encode (exact: E2M1 times a power of two fits BF16)."""
        return dequantize(*self.read_packed(r0, r1, 1))


@dataclass(frozen=True)
class RowSlice(_Computed):
    """One expert's slice of a fused per-expert vector (gpt-oss biases: [E, rows], gate/up interleaved)."""

    info: TensorInfo
    source: SourceTensor
    expert: int
    start: int
    step: int

    @property
    def origin(self) -> SourceTensor:
        return self.source

    @property
    def stored(self) -> tuple[SourceTensor, ...]:
        return ()

    def read_rows(self, r0: int, r1: int) -> torch.Tensor:
        row = read_rows(self.source.file, self.source.info, self.expert, self.expert + 1)[0]
        return row[self.start :: self.step].reshape(1, -1)


def _gpt_oss(ckpt: Checkpoint[SourceTensor]) -> dict[str, CheckpointTensor]:
    """gpt-oss tensors with its fused MXFP4 experts as PackedExperts and biases split per expert."""
    out: dict[str, CheckpointTensor] = {}
    proj = {"gate_up_proj": (("gate_proj", 0, 2), ("up_proj", 1, 2)), "down_proj": (("down_proj", 0, 1),)}
    for name, t in ckpt.tensors.items():
        m = re.match(r"^(.*\.experts)\.(gate_up_proj|down_proj)_(blocks|scales|bias)$", name)
        if not m:
            out[name] = t
            continue
        prefix, kind, part = m.groups()
        if part == "blocks":
            scales = ckpt.tensors.get(f"{prefix}.{kind}_scales")
            if scales is None or t.info.shape[:-1] != scales.info.shape:
                raise QstreamError(f"{name}: no matching {kind}_scales; the gpt-oss checkpoint is incomplete")
            e, rows, g, b = t.info.shape
            info = TensorInfo(f"{prefix}.{kind}", "MXFP4", (e, rows, g * b * 2), 0, t.info.nbytes + scales.info.nbytes)
            out[info.name] = PackedExperts(info, t, scales, interleaved=kind == "gate_up_proj")
        elif part == "bias":
            n_exp, rows = t.info.shape
            for e in range(n_exp):
                for leaf, start, step in proj[kind]:
                    bname = f"{prefix}.{e}.{leaf}.bias"
                    size = rows // step
                    info = TensorInfo(bname, t.info.dtype, (size,), 0, size * t.info.nbytes // t.info.numel)
                    out[bname] = RowSlice(info, t, e, start, step)
    return out


def _float(s: torch.Tensor) -> torch.Tensor:
    return s.float()


def _e8m0(s: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones(()), s.to(torch.int32).float() - 127)


@dataclass(frozen=True)
class SourceFormat:
    name: str
    description: str
    matches: Callable[[dict], bool]  # on quantization_config
    scale_suffix: str
    block: Callable[[dict, tuple[int, ...], tuple[int, ...]], tuple[int, int]]  # (qcfg, weight, scale) -> block
    scale_decode: Callable[[torch.Tensor], torch.Tensor]
    scheme: Callable[[dict, str, tuple[int, int], tuple[int, int]], dict]  # (qcfg, module, block, shape) -> group


def _ct_weights(q: dict) -> list[dict]:
    return [g.get("weights") or {} for g in (q.get("config_groups") or {}).values()]


def _fp8_block_scheme(q: dict, module: str, block: tuple[int, int], shape: tuple[int, int]) -> dict:
    """The compressed-tensors group that reads block FP8 as vLLM runs it (DeepSeek-style: weight blocks,
    activations quantized per token and `block[1]` columns on the fly, or per tensor with a static scale)."""
    declared = bool(q.get("weight_block_size"))  # then every weight is block-scaled, whatever its shape
    if not declared and block == tuple(shape):
        row = FP8_TENSOR
    elif not declared and block == (1, shape[1]):
        row = FP8_CHANNEL
    else:
        row = FP8_BLOCK
    weights = dict(row.weights)
    if row is FP8_BLOCK:
        weights["block_structure"] = list(block)
    if q.get("activation_scheme", "dynamic") == "static":
        acts = {**FP8_ARGS, "strategy": "tensor", "dynamic": False}
    elif row is FP8_BLOCK:
        acts = {**FP8_ARGS, "strategy": "group", "group_size": block[1], "dynamic": True}
    else:
        acts = {**FP8_ARGS, "strategy": "token", "dynamic": True}
    return {"format": row.ct_format, "weights": weights, "input_activations": acts, "output_activations": None}


def _ct_scheme(q: dict, module: str, block: tuple[int, int], shape: tuple[int, int]) -> dict:
    """The source's own config group for `module`: the first naming it, else (a routed expert) the first naming
    its layer's expert 0, as vLLM reads it and as `quantize` writes a mixed output's targets; else the one
    targeting Linear."""
    groups = [g for g in (q.get("config_groups") or {}).values() if isinstance(g, dict)]

    def naming(*names: str) -> dict | None:
        return next((g for g in groups if any(matches(g.get("targets") or [], n) for n in names)), None)

    group = naming(module, merged_name(module)) or naming(expert_zero(module)) or next(
        (g for g in groups if "Linear" in (g.get("targets") or [])), None)
    if group is None:
        raise QstreamError(f"{module}: FP8 in the source, but no config group of its quantization_config targets "
                           "it; the checkpoint's config is inconsistent")
    return {"format": q.get("format"), **{k: v for k, v in group.items() if k != "targets"}}


def _ct_fp8(q: dict) -> bool:
    return (q.get("quant_method") == "compressed-tensors"
            and q.get("format") in (FP8_TENSOR.ct_format, "naive-quantized")
            and all(w.get("num_bits") == 8 and w.get("type") == "float" for w in _ct_weights(q)))


def _ct_block(q: dict, weight: tuple[int, ...], scale: tuple[int, ...]) -> tuple[int, int]:
    """A block group's block_structure for a grid of scales (shapes alone cannot tell a ragged last block)."""
    blocks = [w["block_structure"] for w in _ct_weights(q) if w.get("strategy") == "block" and w.get("block_structure")]
    if blocks and len(scale) == 2 and scale[1] > 1:
        return tuple(blocks[0])
    return _from_shapes(q, weight, scale)


def _from_shapes(q: dict, weight: tuple[int, ...], scale: tuple[int, ...]) -> tuple[int, int]:
    """Per-tensor, per-channel or per-block scales, told apart by the scale's shape."""
    out, n = weight
    if math.prod(scale) == 1:
        return out, n
    rows, cols = (scale[0], scale[1]) if len(scale) == 2 else (scale[0], 1)
    return math.ceil(out / rows), math.ceil(n / cols)


FORMATS: tuple[SourceFormat, ...] = (
    SourceFormat(
        "fp8-block", "block FP8, weight_scale_inv per block (DeepSeek-V3/R1, Kimi K2, Qwen3-*-FP8)",
        lambda q: q.get("quant_method") == "fp8",
        "weight_scale_inv",
        lambda q, w, s: tuple(q.get("weight_block_size") or _from_shapes(q, w, s)),
        _float, _fp8_block_scheme,
    ),
    SourceFormat(
        "ct-fp8", "compressed-tensors float-quantized FP8 (per-tensor, per-channel or block weight_scale)",
        _ct_fp8, _SCALE, _ct_block, _float, _ct_scheme,
    ),
    SourceFormat(
        "ct-mxfp8", "compressed-tensors mxfp8-quantized (FP8 elements, uint8 E8M0 scale per 32)",
        lambda q: q.get("quant_method") == "compressed-tensors" and q.get("format") == MXFP8_FORMAT.ct_format,
        _SCALE, lambda q, w, s: (1, BLOCK), _e8m0, _ct_scheme,
    ),
)

# Source tensors beside a scaled weight that travel with it when it is kept, source suffix -> output suffix.
STORED_SUFFIXES = {"weight": _WEIGHT, "weight_scale_inv": _SCALE, "weight_scale": _SCALE,
                   "input_scale": INPUT_SCALE[1:]}


def quantization_config_of(config: dict) -> dict | None:
    return config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")


def decode_checkpoint(ckpt: Checkpoint[SourceTensor]) -> Checkpoint[CheckpointTensor]:
    """The checkpoint as plain tensors: unchanged if unquantized, FP8/MXFP8 weights decoded to BF16."""
    qcfg = quantization_config_of(ckpt.config)
    if qcfg is None:
        return ckpt
    if qcfg.get("quant_method") == "mxfp4":
        return Checkpoint(ckpt.root, _without_quantization(ckpt.config), _gpt_oss(ckpt), ckpt.weight_files)
    fmt = next((f for f in FORMATS if f.matches(qcfg)), None)
    if fmt is None:
        method = qcfg.get("quant_method", "?") + (f" {qcfg['format']}" if "format" in qcfg else "")
        hint = "; to requantize an MXFP4 checkpoint, run `qstream dequantize` first" if "mxfp4" in str(qcfg) else ""
        supported = "; ".join(f"{f.name}: {f.description}" for f in FORMATS) + "; " + GPT_OSS
        raise QstreamError(
            f"{ckpt.root / 'config.json'}: already quantized ({method}), which qstream cannot read as input{hint}. "
            f"Supported inputs: BF16/FP16/FP32; {supported}"
        )
    decoded, consumed = _decode_weights(ckpt, qcfg, lambda scale: fmt)
    tensors: dict[str, CheckpointTensor] = {n: decoded.get(n, t) for n, t in ckpt.tensors.items() if n not in consumed}
    return Checkpoint(ckpt.root, _without_quantization(ckpt.config), tensors, ckpt.weight_files)


def decode_kept(ckpt: Checkpoint[SourceTensor], qcfg: dict) -> tuple[dict[str, DecodedTensor], set[str]]:
    """FP8/MXFP8 weights kept beside MXFP4 ones in a mixed-precision checkpoint (as `quantize` writes them),
    decoded, and the names of every tensor they consume; the format follows the scale's dtype."""
    by_name = {f.name: f for f in FORMATS}
    return _decode_weights(
        ckpt, qcfg, lambda scale: by_name["ct-mxfp8" if kept_kind(scale.info.dtype) == MXFP8 else "ct-fp8"])


def _decode_weights(ckpt: Checkpoint[SourceTensor], qcfg: dict, format_of: Callable[[SourceTensor], SourceFormat]
                    ) -> tuple[dict[str, DecodedTensor], set[str]]:
    """Every FP8 `X.weight` with its scale as a DecodedTensor; the names it consumes (scales, input_scale)."""
    decoded: dict[str, DecodedTensor] = {}
    consumed: set[str] = set()
    for name, t in ckpt.tensors.items():
        if t.info.dtype not in FP8_DTYPES:
            continue
        if not name.endswith(".weight"):
            raise QstreamError(f"{name}: {t.info.dtype} but not a `.weight` with a scale beside it; an FP8 layout "
                               "qstream does not know (it reads per-module FP8 weights, as DeepSeek-V3 stores them)")
        base = name.removesuffix(".weight")
        scale = next((ckpt.tensors[f"{base}.{s}"] for s in ("weight_scale_inv", _SCALE)
                      if f"{base}.{s}" in ckpt.tensors), None)
        fmt = format_of(scale) if scale is not None else None
        if scale is None or fmt is None or scale.name != f"{base}.{fmt.scale_suffix}":
            expected = fmt.scale_suffix if fmt else _SCALE
            raise QstreamError(f"{name}: {t.info.dtype} with no {expected} beside it; the "
                               f"{fmt.name if fmt else 'FP8'} checkpoint is incomplete or of a layout qstream "
                               "does not know")
        if len(t.info.shape) != 2:
            raise QstreamError(f"{name}: a {len(t.info.shape)}-D {t.info.dtype} weight; qstream decodes 2-D FP8 "
                               "weights only (per-expert tensors, as DeepSeek-V3 and Qwen3-FP8 store them)")
        bo, bi = fmt.block(qcfg, t.info.shape, scale.info.shape)
        block, shape = (int(bo), int(bi)), (t.info.shape[0], t.info.shape[1])
        info = TensorInfo(name, "BF16", t.info.shape, 0, t.info.numel * 2)
        stored = tuple(_renamed(ckpt.tensors[f"{base}.{s}"], f"{base}.{o}")
                       for s, o in STORED_SUFFIXES.items() if f"{base}.{s}" in ckpt.tensors)
        decoded[name] = DecodedTensor(info, t, scale, block, fmt.scale_decode, stored,
                                      fmt.scheme(qcfg, base, block, shape))
        consumed |= {f"{base}.{s}" for s in CONSUMED_SUFFIXES}
    return decoded, consumed


def _renamed(t: SourceTensor, name: str) -> SourceTensor:
    """The same bytes seen under an output name (DeepSeek's weight_scale_inv is compressed-tensors' weight_scale)."""
    return t if t.name == name else SourceTensor(t.file, replace(t.info, name=name))


def _without_quantization(config: dict) -> dict:
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if "text_config" in config:
        config["text_config"] = {k: v for k, v in config["text_config"].items() if k != "quantization_config"}
    return config
