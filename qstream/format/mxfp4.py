"""MXFP4 numerics: pure functions on tensors, no I/O.

A block of 32 consecutive elements along the last dimension shares one power-of-two
scale 2^E stored as the byte E + 127 (E8M0). Each element is an FP4 E2M1 code:
sign << 3 | index into E2M1_MAGNITUDES. Two codes share a byte, the even column in
the low nibble. This module is the fast, vectorised path; `mxfp4_ref` is the slow
reference that defines the bytes, and tests hold this module to it bit for bit.
`BLOCK` and `Rule` live in `rules`, which the CLI reads without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qstream.format.rules import BLOCK, RULES, Rule

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E8M0_BIAS = 127
E_MIN, E_MAX = -127, 127  # byte 255 would be NaN in E8M0: never produced

# Midpoints between neighbouring magnitudes and whether a tie there rounds up.
# A tie goes to the even index (round half to even on the code).
E2M1_MIDPOINTS: tuple[tuple[float, bool], ...] = (
    (0.25, False),  # 0 | 0.5  -> 0
    (0.75, True),  # 0.5 | 1  -> 1
    (1.25, False),  # 1 | 1.5  -> 1
    (1.75, True),  # 1.5 | 2  -> 2
    (2.5, False),  # 2 | 3    -> 2
    (3.5, True),  # 3 | 4    -> 4
    (5.0, False),  # 4 | 6    -> 4
)

# The offsets MSE3's fast paths search (rules.RULES has the proof that the rest never win).
MSE3_SEARCHED = RULES[Rule.MSE3].searched
# Elements whose scaled magnitude y0 = |x| / 2^R is at most this round to zero under every searched
# candidate, so they add the same error to each and are left out of the comparison; this keeps every
# compared sum exact in float64 for bf16/fp16 inputs.
MSE3_ZERO_UNDER_ALL = 0.25 / 2 ** max(MSE3_SEARCHED)


@dataclass(frozen=True)
class Quantized:
    """The two tensors vLLM loads, plus what the report needs about how they were made."""

    packed: torch.Tensor  # uint8 [..., in/2]
    scales: torch.Tensor  # uint8 [..., in/32], E + 127
    sq_error: float  # sum((dequantized - w)^2), float64
    sq_norm: float  # sum(w^2), float64
    offset_counts: tuple[int, int, int]  # blocks whose E is R, R-1, R-2 or below (R = RCEIL's E)


class NonFiniteError(ValueError):
    """Raised when a weight holds NaN or Inf: no scale can represent it."""


def check_shape(shape: tuple[int, ...]) -> None:
    """Raise ValueError unless the last dimension splits into 32-element blocks."""
    if len(shape) < 1 or shape[-1] % BLOCK:
        raise ValueError(f"last dimension {shape[-1] if shape else None} is not a multiple of {BLOCK}")


def _frexp_parts(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """amax = m * 2^F with m in [1, 2); returns (m, F) (garbage where amax == 0)."""
    mant, exp = torch.frexp(amax)
    return mant * 2, exp.to(torch.int32) - 1


def rule_exponents(amax: torch.Tensor, rule: Rule) -> torch.Tensor:
    """Per-block exponent for the closed-form rules, and RCEIL's R for MSE3 (int32)."""
    m, f = _frexp_parts(amax)
    if rule is Rule.FLOOR:
        e = f - 2
    elif rule is Rule.EVEN:
        e = f - 2 + (m >= 1.75).to(torch.int32)
    else:
        e = f - 2 + (m > 1.5).to(torch.int32)
    e = torch.where(amax > 0, e, E_MIN)
    return e.clamp(E_MIN, E_MAX)


def e2m1_index(y: torch.Tensor) -> torch.Tensor:
    """Magnitude index (uint8, 0..7) of non-negative float32 scaled values, nearest with ties to even.

    The index counts the midpoints below y; a midpoint that rounds up on a tie is moved one float32 step
    down, so `y >= mid` becomes `y > mid'` and one bucketize counts them all exactly.
    """
    return torch.bucketize(y, _midpoints(y.device), out_int32=True).to(torch.uint8)


def _midpoints(device: torch.device) -> torch.Tensor:
    mids = torch.tensor([m for m, _ in E2M1_MIDPOINTS], dtype=torch.float32, device=device)
    up = torch.tensor([t for _, t in E2M1_MIDPOINTS], device=device)
    return torch.where(up, torch.nextafter(mids, torch.zeros_like(mids)), mids)


def _magnitudes(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e exactly for integer tensors, as float32 (2^-127 is a float32 subnormal)."""
    return torch.ldexp(torch.ones((), device=e.device), e.to(torch.float32))


def _scaled(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """|x| / 2^E per block; exact, since 2^-E is a float32 power of two for |E| <= 127."""
    return a * _pow2(-e).unsqueeze(-1)


def _mse3_choice(a: torch.Tensor, r: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Offset s in MSE3_SEARCHED per block minimising exact squared error; ties keep the smaller s."""
    y0 = _scaled(a, r)
    counted = y0 > MSE3_ZERO_UNDER_ALL
    best_s = torch.zeros_like(r)
    best_err = torch.full(r.shape, torch.inf, dtype=torch.float64, device=r.device)
    for s in MSE3_SEARCHED:  # ascending s: only a strictly smaller error moves the choice
        q = lut[e2m1_index(y0 * 2**s).long()] / 2**s  # dequantised, in units of 2^R
        d = (q - y0).double()
        err = torch.where(counted, d * d, 0.0).sum(-1)
        err = torch.where(r - s >= E_MIN, err, torch.inf)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    return best_s


def to_blocks(w: torch.Tensor) -> torch.Tensor:
    """w [..., in] (in % 32 == 0) as float32 blocks [-1, in/32, 32]; NonFiniteError on NaN or Inf."""
    check_shape(tuple(w.shape))
    x = w.reshape(-1, w.shape[-1] // BLOCK, BLOCK).float()
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{int((~torch.isfinite(x)).sum())} NaN or Inf value(s)")
    return x


def quantize(w: torch.Tensor, rule: Rule = Rule.MSE3) -> Quantized:
    """Quantize w [..., in] (in % 32 == 0) to MXFP4 codes and scales under `rule`."""
    x = to_blocks(w)
    a = x.abs()
    amax = a.amax(-1)
    r = rule_exponents(amax, Rule.RCEIL)
    if rule is Rule.MSE3:
        e = r - _mse3_choice(a, r, _magnitudes(w.device))
    else:
        e = rule_exponents(amax, rule)
    return encode(x, e, r, tuple(w.shape))


def encode(x: torch.Tensor, e: torch.Tensor, r: torch.Tensor, shape: tuple[int, ...]) -> Quantized:
    """Blocks x [-1, in/32, 32] under the chosen exponents e, every element rounded to nearest (ties to
    even); r is RCEIL's exponent per block, for the offset counts; shape is the weight's own."""
    lead, n = shape[:-1], shape[-1]
    a = x.abs()
    lut = _magnitudes(x.device)
    y = _scaled(a, e)
    idx = e2m1_index(y)
    q = lut[idx.long()]
    codes = idx | ((torch.signbit(x) & (idx > 0)).to(torch.uint8) << 3)
    d = (q - y).double()
    scale2 = torch.ldexp(torch.ones((), dtype=torch.float64, device=x.device), 2 * e.double())  # (2^E)^2 per block
    sq_error = float(((d * d).sum(-1) * scale2).sum())
    offsets = (r - e).clamp(0, 2).flatten()
    counts = torch.bincount(offsets.long(), minlength=3)
    return Quantized(
        packed=pack_codes(codes.reshape(*lead, n)),
        scales=(e + E8M0_BIAS).to(torch.uint8).reshape(*lead, n // BLOCK),
        sq_error=sq_error,
        sq_norm=float((x.double() ** 2).sum()),
        offset_counts=(int(counts[0]), int(counts[1]), int(counts[2])),
    )


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., n] -> bytes [..., n/2], even column in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def _byte_values(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the two E2M1 values (low nibble first) of every possible byte."""
    mag = _magnitudes(device)
    signed = torch.cat((mag, -mag))  # code 8..15: negative (8 is -0, which decodes to 0)
    byte = torch.arange(256, device=device)
    return torch.stack((signed[byte & 0xF], signed[byte >> 4]), dim=-1)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 bytes back to floats: code value * 2^(scale - 127), computed exactly in float32."""
    val = _byte_values(packed.device)[packed.long()]  # [..., in/2, 2]: one lookup per byte
    n = packed.shape[-1] * 2
    val = val.reshape(*packed.shape[:-1], n // BLOCK, BLOCK)
    val = val * _pow2(scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1)
    return val.reshape(*packed.shape[:-1], n).to(dtype)
