"""The error bound of `verify --source`, as pure tensor functions: output bytes against re-quantizing the source.

A block's exponent is fixed by its rule and nearest rounding under a fixed exponent has one error, so a
correct block has exactly the error its rule gives; any block above it (float tolerance aside) has a wrong
scale or wrong codes: a scale off by one exponent makes a block's error several times larger, a
nibble-order bug tens of times. An imatrix output (exponents chosen from calibration statistics, which
verify does not read) is held to what holds for any choice within its candidate set: each block's exponent
within R-depth..R (R = rceil's) and every code the nearest E2M1 value under the stored exponent
(qstream.calib.imatrix).

`compare_fast` reaches the same verdict with a fast quantizer (the C or Triton kernel): a block whose bytes equal
the kernel's re-quantization under a rule meets that rule's bound by definition, and only the blocks that equal no
rule's bytes go through the torch functions above. That verdict is as good as the kernel, which
qstream.check.kernel_audit holds to the torch path on a sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from qstream.calib.imatrix import nearest_code_problems
from qstream.format.mxfp4 import BLOCK, E8M0_BIAS, E_MAX, E_MIN, Quantized, dequantize, quantize
from qstream.format.rules import Method, Rule

ERROR_TOLERANCE = 1e-9  # relative slack on a block's squared error: float64 summation only
TORCH_BLOCKS = 128 * 1024  # blocks the torch fallback of compare_fast holds at once (4 Mi elements)
# Rules whose kernel bytes stand in for an imatrix block's nearest codes: RCEIL (it also gives R) and the two
# rules most often choosing the imatrix exponent; a block under any other exponent goes to the torch check.
NEAREST_CANDIDATES = (Rule.RCEIL, Rule.MSE3, Rule.FLOOR)

Quantizer = Callable[[torch.Tensor, Rule], Quantized]  # qstream.format.kernels.quantize_fast's signature


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, through numpy on CPU: torch's is a parallel elementwise op, 200x slower on 2 loaded cores."""
    if a.device.type != "cpu" or b.device.type != "cpu":
        return torch.equal(a, b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a.numpy(), b.numpy()))


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
        if same_bytes(q.packed, packed) and same_bytes(q.scales, scales):
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


def blocks_equal(q: Quantized, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """bool [rows, in/32]: blocks whose scale byte and 16 code bytes equal q's."""
    codes = (q.packed == packed).reshape(*scales.shape, BLOCK // 2).all(-1)
    return codes & (q.scales == scales)


def _block_parts(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                 idx: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The blocks idx (all if None) of w/packed/scales as [k, 32] / [k, 16] / [k, 1], at most TORCH_BLOCKS
    per part: the torch functions hold float64 copies of what they are given."""
    blocks = w.reshape(-1, BLOCK), packed.reshape(-1, BLOCK // 2), scales.reshape(-1, 1)
    if idx is None:
        return list(zip(*(b.split(TORCH_BLOCKS) for b in blocks)))
    return [tuple(b[part] for b in blocks) for part in idx.split(TORCH_BLOCKS) if part.numel()]  # type: ignore[misc]


def compare_fast(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bound: Bound,
                 kernel: Quantizer) -> tuple[ChunkComparison, dict[Rule, Quantized]]:
    """`bound.compare`'s verdict with `kernel` re-quantizing, and what the kernel wrote per rule it ran (for the
    audit that holds it to the torch path).

    Rules: each of bound.rules is run until one's bytes equal the output's; blocks that equal no rule's bytes
    are held to the torch bound (compare_chunk). Imatrix: a block equal to a candidate rule's bytes has the nearest
    codes under its exponent, which is then checked against R (RCEIL's bytes); the others go to
    nearest_code_problems.
    """
    rules = bound.rules if bound.depth is None else NEAREST_CANDIDATES
    ran: dict[Rule, Quantized] = {}
    unmatched: torch.Tensor | None = None
    for rule in rules:
        q = ran[rule] = kernel(w, rule)
        if bound.depth is None and same_bytes(q.packed, packed) and same_bytes(q.scales, scales):
            return ChunkComparison(q.sq_error, q.sq_norm, scales.numel(), 0, 1.0, True), ran
        differs = ~blocks_equal(q, packed, scales)
        unmatched = differs if unmatched is None else unmatched & differs
        if bound.depth is not None and not unmatched.any():  # (rules: any of them may still match whole)
            break
    assert unmatched is not None  # rules is never empty
    over, worst = 0, 1.0
    if bound.depth is not None:  # matched blocks: nearest codes; their exponent against the kernel's R
        r = ran[Rule.RCEIL].scales.to(torch.int32) - E8M0_BIAS
        e = scales.to(torch.int32) - E8M0_BIAS
        over += int((~unmatched & ((e > r) | (e < (r - bound.depth).clamp(min=E_MIN)))).sum())
    for part in _block_parts(w, packed, scales, unmatched.reshape(-1).nonzero().squeeze(1)):
        c = bound.compare(*part)
        over += c.over
        worst = max(worst, c.worst)
    got = sum(float(block_errors(*part).sum()) for part in _block_parts(w, packed, scales))
    return ChunkComparison(got, next(iter(ran.values())).sq_norm, scales.numel(), over, worst, False), ran
