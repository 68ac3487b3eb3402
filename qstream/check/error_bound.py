"""The error bound of `verify --source`, as pure tensor functions: output bytes against re-quantizing the source.

A block's exponent is fixed by its rule and nearest rounding under a fixed exponent has one error, so a
correct block has exactly the error its rule gives; any block above it (float tolerance aside) has a wrong
scale or wrong codes: a scale off by one exponent makes a block's error several times larger, a
nibble-order bug tens of times. An imatrix output (exponents chosen from calibration statistics, which
verify does not read) is held to what holds for any choice within its candidate set: each block's exponent
within R-depth..R (R = rceil's) and every code the nearest E2M1 value under the stored exponent
(qstream.calib.imatrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qstream.calib.imatrix import nearest_code_problems
from qstream.format.mxfp4 import BLOCK, E8M0_BIAS, E_MAX, dequantize, quantize
from qstream.format.rules import Method, Rule

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


def compare_nearest(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, depth: int) -> ChunkComparison:
    """Hold an imatrix output to what any exponent choice in R-depth..R gives: blocks with an exponent
    outside the set or a code off its nearest value count as over the bound."""
    bad_exponent, bad_codes = nearest_code_problems(w, packed, scales, depth)
    got = block_errors(w, packed, scales)
    over = bad_exponent | bad_codes
    return ChunkComparison(float(got.sum()), float((w.double() ** 2).sum()), scales.numel(), int(over.sum()), 1.0,
                           False)


def compare_exponents(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, depth: int) -> ChunkComparison:
    """Hold a GPTQ output to what holds for any GPTQ result on the MXFP4 grid: each block's exponent within
    R-depth..R (its codes are not the nearest values: GPTQ moves them to cancel earlier columns' errors)."""
    bad_exponent, _ = nearest_code_problems(w, packed, scales, depth)
    got = block_errors(w, packed, scales)
    over = bad_exponent | ~torch.isfinite(got)
    return ChunkComparison(float(got.sum()), float((w.double() ** 2).sum()), scales.numel(), int(over.sum()), 1.0,
                           False)


@dataclass(frozen=True)
class Bound:
    """What each quantized block is held to: the error of re-running its rule (the worst of `rules` when
    the rule is unknown) or, for a calibrated output (`depth` set: imatrix, gptq), exponent (and for imatrix
    codes) as any choice gives."""

    rules: tuple[Rule, ...] = tuple(Rule)
    depth: int | None = None
    method: Method = Method.IMATRIX

    @property
    def name(self) -> str:
        if self.depth is not None:
            return f"{self.method.value} (R-{self.depth}..R)"
        return "/".join(r.value for r in self.rules)

    def compare(self, w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> ChunkComparison:
        if self.depth is None:
            return compare_chunk(w, packed, scales, self.rules)
        if self.method == Method.GPTQ:
            return compare_exponents(w, packed, scales, self.depth)
        return compare_nearest(w, packed, scales, self.depth)

    def failure(self, module: str, over: int, blocks: int, worst: float) -> str:
        if self.depth is None:
            return (f"{module}: {over} of {blocks} blocks have more error than rule {self.name} gives on the source "
                    f"(worst {worst:.3g}x); its scales or codes are wrong")
        codes = "" if self.method == Method.GPTQ else " or codes that are not the nearest values under their exponent"
        return (f"{module}: {over} of {blocks} blocks have an exponent outside R-{self.depth}..R{codes}; its scales "
                "or codes are wrong")
