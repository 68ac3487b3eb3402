"""The reference activation-weighted exponent choice: slow, block by block, exact rational arithmetic.

It defines what `qstream.calib.imatrix.quantize_weighted` writes (module doc there: the objective, the
candidate set, the integer weights, the ties); use it on small tensors only.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from qstream.calib.imatrix import DEPTH, WEIGHT_BITS
from qstream.format.mxfp4 import E2M1_MAGNITUDES, E8M0_BIAS, E_MIN, pack_codes
from qstream.format.mxfp4_ref import _block_codes, block_exponent_ref
from qstream.format.rules import BLOCK, Rule


def block_weights_ref(a: list[float]) -> list[int]:
    """floor(a_j * 2^(WEIGHT_BITS - p)), 2^p the power of two just above the block's largest a_j."""
    top = max(a)
    if top == 0:
        return [0] * len(a)
    p = math.frexp(top)[1]  # top = m * 2^p, m in [0.5, 1)
    return [math.floor(Fraction(v) * Fraction(2) ** (WEIGHT_BITS - p)) for v in a]


def element_errors_ref(block: list[float], e: int) -> tuple[list[int], list[Fraction]]:
    """Codes of one block under exponent e (nearest, ties to even) and each element's exact squared error."""
    codes, _ = _block_codes(block, e)
    errs = [(Fraction(E2M1_MAGNITUDES[c & 7]) * Fraction(2) ** e - abs(Fraction(x))) ** 2 for c, x in zip(codes, block)]
    return codes, errs


def weighted_exponent_ref(block: list[float], weights: list[int], depth: int = DEPTH) -> tuple[int, list[int]]:
    """(E, codes) of least (weighted error, unweighted error) over E = R, R-1, ..., R-depth (>= E_MIN);
    scanned from R down with a strict `<`, so ties keep the larger E."""
    r = block_exponent_ref(max(abs(x) for x in block), Rule.RCEIL)
    best: tuple[tuple[Fraction, Fraction], int, list[int]] | None = None
    for e in range(r, max(E_MIN, r - depth) - 1, -1):
        codes, errs = element_errors_ref(block, e)
        key = (sum((k * err for k, err in zip(weights, errs)), Fraction(0)), sum(errs, Fraction(0)))
        if best is None or key < best[0]:
            best = (key, e, codes)
    assert best is not None  # e = r is always scanned
    return best[1], best[2]


def quantize_weighted_ref(w: torch.Tensor, a: torch.Tensor, depth: int = DEPTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of quantize_weighted: (packed uint8 [..., in/2], scales uint8 [..., in/32])."""
    n = w.shape[-1]
    rows = w.reshape(-1, n).float().tolist()
    weights = torch.broadcast_to(a.double(), w.shape).reshape(-1, n).tolist()
    all_codes, all_scales = [], []
    for row, arow in zip(rows, weights):
        for b in range(0, n, BLOCK):
            e, codes = weighted_exponent_ref(row[b:b + BLOCK], block_weights_ref(arow[b:b + BLOCK]), depth)
            all_codes.extend(codes)
            all_scales.append(e + E8M0_BIAS)
    codes_t = torch.tensor(all_codes, dtype=torch.uint8).reshape(w.shape)
    scales_t = torch.tensor(all_scales, dtype=torch.uint8).reshape(*w.shape[:-1], n // BLOCK)
    return pack_codes(codes_t), scales_t
