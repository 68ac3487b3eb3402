"""Activation-weighted MXFP4 exponents ("imatrix"): pure tensor functions, no I/O.

A quantized Linear's output error on input x is sum_j (q_j - w_j) x_j; over tokens, with channels taken as
uncorrelated, its mean square is sum_j a_j (q_j - w_j)^2 with a_j = E[x_j^2] (llama.cpp's "importance
matrix"). Per 32-block this module picks the shared exponent that minimises that sum over a candidate set;
every element still rounds to nearest (ties to even) under the chosen exponent, so only the scale byte can
differ from a data-free rule and the format is unchanged. `qstream.calib.imatrix_ref` is the slow reference
that defines the choice; tests hold this module to it bit for bit.

Which exponents can win. R is RCEIL's exponent, the smallest that clips nothing (the block maximum lies in
(3, 6] in units of 2^R, unless R is clamped at E_MIN).
- None above R, whatever the weights. In units of 2^R every |x_j| <= 6. The grid of R+1 is {0, 1, 2, 3, 4,
  6, 8, 12}: its points up to 6 all lie on R's grid {0, .5, 1, 1.5, 2, 3, 4, 6}, and its points beyond 6
  are farther from any |x_j| <= 6 than 6 is (likewise for R+2, ...). So each element's nearest error under
  R+k is at least its error under R, and so is any sum of them with non-negative weights: an exponent above
  R can at best tie with R, and ties go to the larger exponent within the set, which is R.
- Every exponent at or below R can win. An element 1.5 * 2^(R-k) that carries all the weight is exact
  under R-k (and under R-k-1, R-k-2, which clip the rest of the block harder), and not under R-k+1 ... R.
  So how deep to search is a choice, not a theorem: the set is {R - depth, ..., R} (never below E_MIN),
  with DEPTH chosen by measurement (bench/bench_imatrix.py), and `qstream verify` holds an output to it.
- Under equal weights nothing below R-1 wins, at any depth (the MSE3 argument in qstream.format.mxfp4 holds for
  every R-k, k >= 2: clipping the block maximum to 6 * 2^(R-k) <= 1.5 * 2^R costs more than all 31 other
  elements can save), so with equal weights this choice is exactly MSE3's.

Exactness. The choice must not depend on device, chunking or summation order, and must equal the rational
reference even on ties, so the objective is an exact integer:
- Weights: per block, k_j = floor(a_j * 2^(WEIGHT_BITS - p)) with 2^p the power of two just above the
  block's largest a_j. Only ratios within a block matter to the choice; an element weighing under 2^-16 of
  the block's heaviest counts as 0 (a calibration estimate is far less precise than that).
- Errors: in units of 2^R, d_j = q_j - |x_j| is exact in float32 (Sterbenz, or q_j = 0, or clipped), and
  for every element above Y_ZERO it is a multiple of 2^-UNIT_SHIFT, so n_j = |d_j| * 2^UNIT_SHIFT is an
  integer below 2^36. Elements at or below Y_ZERO round to 0 under every candidate (depth <= MAX_DEPTH) and
  add the same error to each, so they are left out.
- Sums: k n^2 needs up to 88 bits, so n = h * 2^16 + l and sum_j k n^2 = A * 2^32 + B * 2^16 + C with A, B
  and C int64 sums that cannot overflow (k < 2^16, h < 2^20, 32 terms); carries then give (A', low 32 bits).
  Those exact sums are costly, so float32 sums decide first, and only blocks whose float32 leader is
  within rounding of a rival (ties, all-zero weights) are decided exactly.
Ties: less weighted error, then less unweighted error (so a block whose weights are all 0 takes MSE3's
choice), then the larger exponent.
"""

from __future__ import annotations

import torch

from qstream.format.mxfp4 import (
    E8M0_BIAS,
    E_MAX,
    E_MIN,
    Quantized,
    _magnitudes,
    _scaled,
    dequantize,
    e2m1_index,
    encode,
    rule_exponents,
    to_blocks,
)
from qstream.format.rules import BLOCK, Rule

WEIGHT_BITS = 16  # precision of a block's weights, relative to its heaviest element
MAX_DEPTH = 8  # deepest candidate set the exact integer sums allow
DEPTH = 2  # the default set {R-2, R-1, R}: see bench/bench_imatrix.py for the measurement
UNIT_SHIFT = 25 + MAX_DEPTH  # d * 2^UNIT_SHIFT is an integer for every element above Y_ZERO
Y_ZERO = 0.25 / 2**MAX_DEPTH  # in units of 2^R: at or below it, an element rounds to 0 under every candidate
_LIMB = 16
# Float32 sums of 32 non-negative products k * d * d (two roundings each) lie within 33 * 2^-24 < 2^-18.9
# of exact, relative, in any summation order; a candidate leading by more than this margin is the exact
# choice too.
SURE_MARGIN = 2.0**-17


def block_weights(a: torch.Tensor) -> torch.Tensor:
    """Channel weights a [..., in] (finite, >= 0) -> integer weights int64 [..., in/32, 32], < 2^WEIGHT_BITS."""
    ab = a.double().reshape(*a.shape[:-1], a.shape[-1] // BLOCK, BLOCK)
    if not (torch.isfinite(ab).all() and (ab >= 0).all()):
        raise ValueError("channel weights must be finite and non-negative")
    _, p = torch.frexp(ab.amax(-1, keepdim=True))  # block max < 2^p (p = 0 for an all-zero block)
    m, ex = torch.frexp(ab)  # a = m * 2^ex, m in [0.5, 1)
    shift = WEIGHT_BITS + ex - p  # a * 2^(WEIGHT_BITS - p) = m * 2^shift, shift <= WEIGHT_BITS
    scaled = torch.ldexp(m, shift.clamp(min=0).double())  # exact: m has 53 bits, shift in [0, 16]
    return torch.where(shift > 0, torch.floor(scaled), 0.0).long()


def _exact_key(k: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """sum_j k_j n_j^2 over the last dim, exactly, as int64 [..., 2] = (value >> 32, value & (2^32 - 1))."""
    h, lo = n >> _LIMB, n & ((1 << _LIMB) - 1)
    a = (k * h * h).sum(-1)
    b = (2 * k * h * lo).sum(-1)
    c = (k * lo * lo).sum(-1)
    b = b + (c >> _LIMB)
    a = a + (b >> _LIMB)
    low = ((b & ((1 << _LIMB) - 1)) << _LIMB) | (c & ((1 << _LIMB) - 1))
    return torch.stack((a, low), dim=-1)


def _less(key: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Lexicographic key < best over the last dim (int64 [..., K])."""
    diff = key != best
    first = diff.to(torch.uint8).argmax(-1, keepdim=True)  # first differing component
    return diff.any(-1) & (key.gather(-1, first) < best.gather(-1, first)).squeeze(-1)


def _delta(y: torch.Tensor, s: int, lut: torch.Tensor) -> torch.Tensor:
    """q - y under exponent R - s, in units of 2^R: exact in float32 (module doc)."""
    return lut[e2m1_index(y * 2**s).long()] / 2**s - y


def weighted_offsets(a: torch.Tensor, k: torch.Tensor, r: torch.Tensor, depth: int = DEPTH) -> torch.Tensor:
    """Offset s (E = R - s, 0 <= s <= depth, R - s >= E_MIN) per block minimising the exact weighted error.

    a: |x| float32 [N, nb, 32]; k: block_weights broadcastable to it; r: RCEIL's exponents int32 [N, nb].
    Float32 sums decide every block whose best candidate leads the others by more than their rounding
    (SURE_MARGIN); the few near-ties (exact ties included) are decided again by the exact integer sums.
    """
    if not 0 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth {depth} outside 0..{MAX_DEPTH}")
    y = _scaled(a, r)
    counted = y > Y_ZERO
    lut = _magnitudes(a.device)
    kf = k.float()  # exact: k < 2^16
    errs = []
    for s in range(depth + 1):
        d = torch.where(counted, _delta(y, s, lut), 0.0)
        errs.append(torch.where(r - s >= E_MIN, (kf * d * d).sum(-1), torch.inf))
    err = torch.stack(errs, -1)
    best = err.argmin(-1)  # the first least: ties keep the larger exponent, as the exact order does
    lead = err.gather(-1, best.unsqueeze(-1))
    sure = (err - lead > SURE_MARGIN * (err + lead)) | torch.isinf(err)
    sure.scatter_(-1, best.unsqueeze(-1), True)
    unsure = ~sure.all(-1)
    if unsure.any():
        best[unsure] = _exact_offsets(y[unsure], torch.broadcast_to(k, y.shape)[unsure], r[unsure], depth, lut)
    return best.to(torch.int32)


def _exact_offsets(y: torch.Tensor, k: torch.Tensor, r: torch.Tensor, depth: int, lut: torch.Tensor) -> torch.Tensor:
    """weighted_offsets decided by exact integer sums: y [M, 32] in units of 2^R, k [M, 32], r [M]."""
    counted = y > Y_ZERO
    ones = torch.ones((), dtype=torch.int64, device=y.device)

    def key(s: int) -> torch.Tensor:
        """(weighted error, unweighted error) of every block under R - s, each as two int64 parts."""
        n = torch.where(counted, _delta(y, s, lut).abs().double() * 2.0**UNIT_SHIFT, 0.0).long()
        return torch.cat((_exact_key(k, n), _exact_key(ones, n)), dim=-1)

    best, best_s = key(0), torch.zeros_like(r, dtype=torch.int64)
    for s in range(1, depth + 1):
        cand = key(s)
        better = _less(cand, best) & (r - s >= E_MIN)  # equal keys keep the larger exponent
        best = torch.where(better.unsqueeze(-1), cand, best)
        best_s = torch.where(better, s, best_s)
    return best_s


def quantize_weighted(w: torch.Tensor, a: torch.Tensor, depth: int = DEPTH) -> Quantized:
    """Quantize w [..., in] with per-block exponents of least a-weighted squared error (see module doc).

    a: per input channel weights, [in] (one per column, shared by all rows) or w's shape; finite, >= 0.
    """
    if a.shape[-1] != w.shape[-1]:
        raise ValueError(f"channel weights of shape {list(a.shape)} do not fit a weight of shape {list(w.shape)}")
    x = to_blocks(w)
    k = block_weights(a if a.dim() == 1 else torch.broadcast_to(a, w.shape).reshape(-1, w.shape[-1]))
    ax = x.abs()
    r = rule_exponents(ax.amax(-1), Rule.RCEIL)
    e = r - weighted_offsets(ax, k.to(w.device), r, depth)
    return encode(x, e, r, tuple(w.shape))


def nearest_code_problems(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                          depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What `qstream verify` holds any imatrix output to, per block of w [rows, in]: (exponent outside
    {R - depth, ..., R} (not below E_MIN), decoded values not the nearest E2M1 values under the stored
    exponent). Both bool [rows, in/32]. Comparing values, not bytes, accepts either code for zero."""
    x = to_blocks(w)
    r = rule_exponents(x.abs().amax(-1), Rule.RCEIL)
    e = scales.reshape(r.shape).to(torch.int32) - E8M0_BIAS
    bad_exponent = (e > r) | (e < (r - depth).clamp(min=E_MIN))
    e = e.clamp(E_MIN, E_MAX)
    nearest = encode(x, e, r, tuple(w.shape))
    got = dequantize(packed, (e + E8M0_BIAS).to(torch.uint8).reshape(scales.shape), torch.float32)
    want = dequantize(nearest.packed, nearest.scales, torch.float32)
    bad_codes = (got != want).reshape(r.shape + (BLOCK,)).any(-1)
    return bad_exponent.reshape(scales.shape), bad_codes.reshape(scales.shape)
