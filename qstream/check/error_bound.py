"""The error bound of `verify --source`, as pure tensor functions: output bytes against re-quantizing the source.

A block's exponent is fixed by its rule and nearest rounding under a fixed exponent has one error, so a
correct block has exactly the error its rule gives; any block above it (float tolerance aside) has a wrong
scale or wrong codes: a scale off by one exponent makes a block's error several times larger, a
nibble-order bug tens of times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qstream.format.mxfp4 import BLOCK, E8M0_BIAS, E_MAX, dequantize, quantize
from qstream.format.rules import Rule

ERROR_TOLERANCE = 1e-9  # relative slack on a block's squared error: float64 summation only


def block_errors(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Squared error of each 32-block of w [rows, in] as decoded from packed/scales, in float64.

    Scale bytes above E_MAX (255 is NaN) decode as infinite error rather than a number.
    """
    deq = dequantize(packed, scales.clamp(max=E_MAX + E8M0_BIAS), torch.float64)
    err = (deq - w.double()).pow(2).reshape(*w.shape[:-1], -1, BLOCK).sum(-1)
    return torch.where(scales > E_MAX + E8M0_BIAS, torch.inf, err)


@dataclass(frozen=True)
class ChunkComparison:
    sq_error: float  # of the output's blocks
    sq_norm: float
    blocks: int
    over: int  # blocks whose error exceeds the bound
    worst: float  # largest output / bound error ratio among them (1.0 if none)
    identical: bool  # bytes equal to one rule's quantization


def compare_chunk(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                  rules: tuple[Rule, ...]) -> ChunkComparison:
    """Hold output bytes for w to the error its rule gives, block by block (several rules: the worst of them).

    Bytes equal to a rule's own quantization meet the bound by definition, which skips the float64 pass.
    """
    qs = [quantize(w, r) for r in rules]
    blocks = scales.numel()
    for q in qs:
        if torch.equal(q.packed, packed) and torch.equal(q.scales, scales):
            return ChunkComparison(q.sq_error, q.sq_norm, blocks, 0, 1.0, True)
    got = block_errors(w, packed, scales)
    bound = torch.stack([block_errors(w, q.packed, q.scales) for q in qs]).amax(0)
    over = got > bound * (1 + ERROR_TOLERANCE)
    worst = float((got[over] / bound[over]).max()) if over.any() else 1.0
    return ChunkComparison(float(got.sum()), qs[0].sq_norm, blocks, int(over.sum()), worst, False)
