"""The reference MXFP4 quantizer: slow, element by element, exact rational arithmetic.

It defines the bytes qstream writes; every fast path (`mxfp4.quantize`, the CPU and
GPU kernels) must equal it bit for bit. Use it on small tensors only.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from qstream.format.mxfp4 import BLOCK, E2M1_MAGNITUDES, E8M0_BIAS, E_MAX, E_MIN, pack_codes
from qstream.format.rules import RULES, Rule


def block_exponent_ref(amax: float, rule: Rule) -> int:
    """The closed-form exponent of FORMAT.md section 1 for one block (RCEIL's for MSE3)."""
    if amax == 0:
        return E_MIN
    mant, exp = math.frexp(amax)  # amax = mant * 2^exp, mant in [0.5, 1)
    m, f = 2 * mant, exp - 1
    e = {
        Rule.FLOOR: f - 2,
        Rule.EVEN: f - 2 + (m >= 1.75),
        Rule.RCEIL: math.ceil(math.log2(amax / 6)) if amax / 6 > 0 else E_MIN,
        Rule.MSE3: math.ceil(math.log2(amax / 6)) if amax / 6 > 0 else E_MIN,
    }[rule]
    if rule in (Rule.RCEIL, Rule.MSE3):
        # log2 of a float may round; the defining property is 6 * 2^(e-1) < amax <= 6 * 2^e.
        while 6 * Fraction(2) ** e < Fraction(amax):
            e += 1
        while 6 * Fraction(2) ** (e - 1) >= Fraction(amax):
            e -= 1
    return max(E_MIN, min(E_MAX, e))


def nearest_index_ref(y: Fraction) -> int:
    """Index of the E2M1 magnitude nearest to y >= 0 (clamped to 6); ties to the even index."""
    y = min(y, Fraction(6))
    dists = [abs(Fraction(v) - y) for v in E2M1_MAGNITUDES]
    best = min(dists)
    candidates = [i for i, d in enumerate(dists) if d == best]
    return min(candidates, key=lambda i: (i % 2, i))


def _block_codes(block: list[float], e: int) -> tuple[list[int], Fraction]:
    """Codes of one block under exponent e, and its exact squared error."""
    scale = Fraction(2) ** e
    codes, err = [], Fraction(0)
    for x in block:
        idx = nearest_index_ref(Fraction(abs(x)) / scale)
        sign = 1 if (math.copysign(1.0, x) < 0 and idx > 0) else 0
        codes.append(sign << 3 | idx)
        q = Fraction(E2M1_MAGNITUDES[idx]) * scale * (-1 if x < 0 else 1)
        err += (q - Fraction(x)) ** 2
    return codes, err


def quantize_ref(w: torch.Tensor, rule: Rule = Rule.MSE3) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantizer: (packed uint8 [..., in/2], scales uint8 [..., in/32])."""
    rows = w.reshape(-1, w.shape[-1]).float().tolist()
    all_codes, all_scales = [], []
    for row in rows:
        for b in range(0, len(row), BLOCK):
            block = row[b : b + BLOCK]
            if any(not math.isfinite(x) for x in block):
                raise ValueError("NaN/Inf in weight")
            e = block_exponent_ref(max(abs(x) for x in block), rule)
            if rule is Rule.MSE3:
                tries = [(_block_codes(block, e - s), e - s) for s in RULES[Rule.MSE3].candidates if e - s >= E_MIN]
                # min keeps the first of equal errors: ascending s, so on equal error the larger E wins
                (codes, _), chosen = min(tries, key=lambda t: t[0][1])
            else:
                codes, _ = _block_codes(block, e)
                chosen = e
            all_codes.extend(codes)
            all_scales.append(chosen + E8M0_BIAS)
    codes_t = torch.tensor(all_codes, dtype=torch.uint8).reshape(w.shape)
    scales_t = torch.tensor(all_scales, dtype=torch.uint8).reshape(*w.shape[:-1], w.shape[-1] // BLOCK)
    return pack_codes(codes_t), scales_t
