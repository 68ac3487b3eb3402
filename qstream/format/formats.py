"""The storage formats of a Linear weight on disk, one table, as compressed-tensors names and stores them.

One row per format: the compressed-tensors format string of its config group and the weight arguments
that group declares, the parameter suffixes and safetensors dtypes of the weight and its scale, the bits
a weight element takes, and the rule its scale's shape follows (llama.cpp keeps its type traits, and
compressed-tensors its parameter names per format, the same way). The planner writes configs and tensors
from these rows; verify, dequantize, the model card and the vLLM check read them back. The table is the
spec: what holds a writer to it are the independent readers (compressed-tensors' parser and decompressor,
vLLM), not a second copy of it. `kind` is what `ignore` and config groups tell apart: FP8 per tensor,
channel or block are one kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from qstream.format.rules import BLOCK

BF16, MXFP4, FP8, MXFP8 = "BF16", "MXFP4", "FP8", "MXFP8"  # kinds; BF16 = unquantized, whatever float dtype
MIXED_PRECISION = "mixed-precision"  # compressed-tensors' top-level format when its groups differ
FLOAT_DTYPES = ("BF16", "F16", "F32")  # plain float weights: what MXFP4 quantization reads
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # FP8 elements qstream reads as input
FP8_ARGS = {"num_bits": 8, "type": "float", "symmetric": True}  # compressed-tensors arguments of any FP8 tensor
INPUT_SCALE = ".input_scale"  # a static FP8 activation scale, stored beside the weight


def _per_block(weight: tuple[int, ...], scale: tuple[int, ...]) -> bool:
    """MX formats: one scale per 32 elements along the input dimension."""
    return bool(weight) and weight[-1] % BLOCK == 0 and scale == (*weight[:-1], weight[-1] // BLOCK)


def _per_tensor(weight: tuple[int, ...], scale: tuple[int, ...]) -> bool:
    return math.prod(scale) == 1


def _per_channel(weight: tuple[int, ...], scale: tuple[int, ...]) -> bool:
    return scale == (weight[0], 1)


def _per_2d_block(weight: tuple[int, ...], scale: tuple[int, ...]) -> bool:
    """A grid of blocks no finer than the weight (a ragged last block is allowed)."""
    return len(scale) == 2 and all(0 < s <= w for s, w in zip(scale, weight))


@dataclass(frozen=True)
class StorageFormat:
    """How one format lays a Linear weight `<module>.weight` [out, in] out on disk."""

    name: str
    kind: str
    ct_format: str | None  # compressed-tensors format string of its config group (None: unquantized)
    weights: dict[str, object]  # its config group's weight arguments, in the order written ({}: none)
    weight_suffix: str  # "<module><suffix>" holds the weight's elements
    weight_dtypes: tuple[str, ...]  # safetensors dtypes the stored elements may have
    bits: int  # per weight element as stored
    scale_suffix: str = ""  # "": no scale
    scale_dtypes: tuple[str, ...] = ()
    scale_rule: Callable[[tuple[int, ...], tuple[int, ...]], bool] | None = None

    def stored_width(self, in_features: int) -> int:
        """Elements per row of the stored weight tensor (MXFP4: two codes per byte)."""
        return in_features * self.bits // (8 * _itemsize(self.weight_dtypes[0]))

    def in_features(self, stored_width: int) -> int:
        """The logical input dimension of a stored row of `stored_width` elements."""
        return stored_width * 8 * _itemsize(self.weight_dtypes[0]) // self.bits

    def scale_fits(self, weight: tuple[int, ...], scale: tuple[int, ...]) -> bool:
        """Whether a scale of this shape belongs to a weight of that (logical) shape under this format."""
        return self.scale_rule is not None and self.scale_rule(tuple(weight), tuple(scale))


def _itemsize(dtype: str) -> int:
    return {"U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BF16": 2, "F16": 2, "F32": 4}[dtype]


_MX_WEIGHTS = {"type": "float", "strategy": "group", "group_size": BLOCK, "symmetric": True, "dynamic": False,
               "scale_dtype": "torch.uint8"}

MXFP4_FORMAT = StorageFormat("MXFP4", MXFP4, "mxfp4-pack-quantized", {"num_bits": 4, **_MX_WEIGHTS},
                             ".weight_packed", ("U8",), 4, ".weight_scale", ("U8",), _per_block)
MXFP8_FORMAT = StorageFormat("MXFP8", MXFP8, "mxfp8-quantized", {"num_bits": 8, **_MX_WEIGHTS},
                             ".weight", ("F8_E4M3",), 8, ".weight_scale", ("U8",), _per_block)
FP8_TENSOR = StorageFormat("FP8 per tensor", FP8, "float-quantized",
                           {**FP8_ARGS, "strategy": "tensor", "dynamic": False},
                           ".weight", ("F8_E4M3",), 8, ".weight_scale", FLOAT_DTYPES, _per_tensor)
FP8_CHANNEL = StorageFormat("FP8 per channel", FP8, "float-quantized",
                            {**FP8_ARGS, "strategy": "channel", "dynamic": False},
                            ".weight", ("F8_E4M3",), 8, ".weight_scale", FLOAT_DTYPES, _per_channel)
FP8_BLOCK = StorageFormat("FP8 per block", FP8, "float-quantized",
                          {**FP8_ARGS, "strategy": "block", "block_structure": None, "dynamic": False},
                          ".weight", ("F8_E4M3",), 8, ".weight_scale", FLOAT_DTYPES, _per_2d_block)
BF16_FORMAT = StorageFormat("BF16", BF16, None, {}, ".weight", FLOAT_DTYPES, 16)

STORAGE_FORMATS = (MXFP4_FORMAT, MXFP8_FORMAT, FP8_TENSOR, FP8_CHANNEL, FP8_BLOCK, BF16_FORMAT)
FP8_FORMATS = (FP8_TENSOR, FP8_CHANNEL, FP8_BLOCK)
GROUP_FORMATS = {f.kind: f.ct_format for f in STORAGE_FORMATS if f.ct_format}  # kind -> its group's format
# FP8 elements a kept FP8/MXFP8 weight may have: what compressed-tensors groups and vLLM read
KEPT_FP8_DTYPES = tuple(dict.fromkeys(d for f in STORAGE_FORMATS if f.kind in (FP8, MXFP8) for d in f.weight_dtypes))
PACKED, SCALE = MXFP4_FORMAT.weight_suffix, MXFP4_FORMAT.scale_suffix


def scheme_format(group: dict) -> str:
    """The kind of storage a compressed-tensors config group describes (BF16 if it has no weight scheme)."""
    w = group.get("weights") or {}
    if w.get("type") != "float":
        return BF16 if not w else f"{w.get('type')}{w.get('num_bits')}"
    if w.get("num_bits") == 4 and w.get("group_size") == BLOCK:
        return MXFP4
    if w.get("num_bits") == 8:
        return MXFP8 if w.get("strategy") == "group" and w.get("group_size") == BLOCK else FP8
    return f"float{w.get('num_bits')}"


def kept_kind(scale_dtype: str | None) -> str:
    """An FP8-element weight kept in a checkpoint is MXFP8 when its scale is E8M0 bytes, else FP8."""
    return MXFP8 if scale_dtype in MXFP8_FORMAT.scale_dtypes else FP8


def scale_fits_kind(kind: str, weight: tuple[int, ...], scale: tuple[int, ...]) -> bool:
    """Whether some format of this kind stores a weight of this shape with a scale of that shape."""
    return len(weight) == 2 and any(f.scale_fits(weight, scale) for f in STORAGE_FORMATS if f.kind == kind)
