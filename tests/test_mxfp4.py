"""Numerics: hand-computed blocks, fast path == reference bit for bit, and properties."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qstream.format.mxfp4 import (
    E2M1_MAGNITUDES,
    NonFiniteError,
    Rule,
    dequantize,
    pack_codes,
    quantize,
    unpack_codes,
)
from qstream.format.mxfp4_ref import block_exponent_ref, nearest_index_ref, quantize_ref


def block(values: list[float]) -> torch.Tensor:
    """A single 32-element block: the values, padded with zeros."""
    return torch.tensor([values + [0.0] * (32 - len(values))], dtype=torch.float32)


def scale_of(w: torch.Tensor, rule: Rule) -> int:
    return int(quantize(w, rule).scales[0, 0]) - 127


def codes_of(w: torch.Tensor, rule: Rule) -> list[int]:
    return unpack_codes(quantize(w, rule).packed)[0].tolist()


# amax, expected E per rule: amax = m * 2^F
EXPONENT_CASES = [
    (6.0, {Rule.FLOOR: 0, Rule.EVEN: 0, Rule.RCEIL: 0}),  # m = 1.5: fits exactly
    (6.5, {Rule.FLOOR: 0, Rule.EVEN: 0, Rule.RCEIL: 1}),  # m = 1.625: floor/even clip to 6
    (7.0, {Rule.FLOOR: 0, Rule.EVEN: 1, Rule.RCEIL: 1}),  # m = 1.75: even rounds up
    (4.0, {Rule.FLOOR: 0, Rule.EVEN: 0, Rule.RCEIL: 0}),  # m = 1
    (1.0, {Rule.FLOOR: -2, Rule.EVEN: -2, Rule.RCEIL: -2}),
    (0.75, {Rule.FLOOR: -3, Rule.EVEN: -3, Rule.RCEIL: -3}),  # m = 1.5
    (2.0**100 * 1.9, {Rule.FLOOR: 98, Rule.EVEN: 99, Rule.RCEIL: 99}),
    (2.0**-120, {Rule.FLOOR: -122, Rule.EVEN: -122, Rule.RCEIL: -122}),
    (2.0**-130, {Rule.FLOOR: -127, Rule.EVEN: -127, Rule.RCEIL: -127}),  # clamped at the bottom of E8M0
]


@pytest.mark.parametrize("amax,expected", EXPONENT_CASES)
def test_rule_exponents_by_hand(amax: float, expected: dict[Rule, int]) -> None:
    for rule, e in expected.items():
        assert scale_of(block([amax, -amax / 3]), rule) == e, rule
        assert block_exponent_ref(amax, rule) == e, rule


def test_ties_round_to_even_code() -> None:
    # scale 2^0 (amax 6): every midpoint of the E2M1 grid, then negatives
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]
    assert codes_of(block(mids), Rule.FLOOR)[:8] == [0, 2, 2, 4, 4, 6, 6, 7]
    assert codes_of(block([-m for m in mids]), Rule.FLOOR)[:8] == [0, 10, 10, 12, 12, 14, 14, 15]


def test_clipping_and_packing_example() -> None:
    vals = [0.5, 6.0, -1.0, 0.0, -6.0, 1.5, 3.0, -0.5]
    q = quantize(block(vals), Rule.FLOOR)
    assert bytes(q.packed[0, :4].tolist()) == bytes.fromhex("710a3f95")
    # 6.5 under FLOOR (E = 0) clips to 6; under RCEIL (E = 1) it is 6 = 3 * 2
    for rule, expect in ((Rule.FLOOR, 6.0), (Rule.RCEIL, 6.0), (Rule.EVEN, 6.0)):
        q = quantize(block([6.5]), rule)
        assert dequantize(q.packed, q.scales, torch.float32)[0, 0] == expect
    q = quantize(block([7.0]), Rule.FLOOR)  # clips to 6 at E = 0; EVEN and RCEIL reach 8 at E = 1
    assert dequantize(q.packed, q.scales, torch.float32)[0, 0] == 6.0
    q = quantize(block([7.0]), Rule.EVEN)
    assert dequantize(q.packed, q.scales, torch.float32)[0, 0] == 8.0


def test_zero_block_and_negative_zero() -> None:
    for w in (torch.zeros(1, 64), -torch.zeros(1, 64)):
        for rule in Rule:
            q = quantize(w, rule)
            assert q.scales.tolist() == [[0, 0]]
            assert q.packed.eq(0).all()
    # a small negative that rounds to zero is written as +0, never as the -0 code 0x8
    assert codes_of(block([6.0, -0.1]), Rule.FLOOR)[:2] == [7, 0]


def test_nan_and_inf_refused() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(NonFiniteError):
            quantize(block([1.0, bad]))


def test_indivisible_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.ones(2, 48))


def test_pack_unpack_roundtrip() -> None:
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes)), codes)


def special_tensor(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows at very different scales plus rows built to hit ties, clips and extremes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 128, generator=g) * torch.exp2(torch.randint(-20, 20, (24, 1), generator=g).float())
    w[0] = 0
    w[1] = -0.0
    w[2, :32] = torch.tensor(E2M1_MAGNITUDES * 4)
    w[3, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5] * 4) * 2.0**-3
    w[4] = torch.randn(128, generator=g) * 2.0**-128  # subnormal: exponent clamps at -127
    w[5] = torch.randn(128, generator=g) * 2.0**120
    w[6, ::7] = 1e4  # a heavy outlier in each block
    return w.to(dtype)


@pytest.mark.parametrize("rule", list(Rule))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fast_equals_reference(rule: Rule, dtype: torch.dtype) -> None:
    w = special_tensor(dtype, seed=hash((rule.value, str(dtype))) % 1000)
    if dtype is torch.float16:
        w = torch.nan_to_num(w.float().clamp(-6e4, 6e4)).to(dtype)
    q = quantize(w, rule)
    packed, scales = quantize_ref(w, rule)
    assert torch.equal(q.packed, packed)
    assert torch.equal(q.scales, scales)


def test_leading_dims_match_2d() -> None:
    w = special_tensor(torch.bfloat16, 3).reshape(4, 6, 128)
    q3, q2 = quantize(w), quantize(w.reshape(24, 128))
    assert q3.packed.shape == (4, 6, 64) and q3.scales.shape == (4, 6, 4)
    assert torch.equal(q3.packed.reshape(24, 64), q2.packed)
    assert torch.equal(q3.scales.reshape(24, 4), q2.scales)


def test_reported_error_matches_dequantized() -> None:
    w = special_tensor(torch.bfloat16, 5)[6:]
    q = quantize(w)
    err = ((dequantize(q.packed, q.scales, torch.float64) - w.double()) ** 2).sum().item()
    assert q.sq_error == pytest.approx(err, rel=1e-9)
    assert q.sq_norm == pytest.approx((w.double() ** 2).sum().item(), rel=1e-12)
    assert sum(q.offset_counts) == w.numel() // 32


def test_quality_on_gaussian_weights() -> None:
    """Good, not just same: MXFP4 of Gaussian weights has SQNR near 18 dB; MSE3 beats FLOOR."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    rel = {r: quantize(w, r).sq_error / quantize(w, r).sq_norm for r in Rule}
    assert 0.005 < rel[Rule.MSE3] < 0.02
    assert rel[Rule.MSE3] < rel[Rule.FLOOR] and rel[Rule.MSE3] <= rel[Rule.EVEN] and rel[Rule.MSE3] < rel[Rule.RCEIL]


# Arbitrary floats, and blocks of exact midpoints (k/4 * 2^s) that hit every tie.
_any = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, width=32)
_ties = st.builds(lambda k, s: k / 4 * 2.0**s, st.integers(-28, 28), st.integers(-30, 30))
finite_blocks = st.lists(st.one_of(_any, _ties), min_size=32, max_size=32).map(
    lambda v: torch.tensor([v], dtype=torch.float32).to(torch.bfloat16)
)


@settings(max_examples=60, deadline=None)
@given(finite_blocks, st.sampled_from(list(Rule)))
def test_decode_is_nearest_representable(w: torch.Tensor, rule: Rule) -> None:
    q = quantize(w, rule)
    e = int(q.scales[0, 0]) - 127
    got = dequantize(q.packed, q.scales, torch.float64)[0].tolist()
    grid = [s * m * 2.0**e for m in E2M1_MAGNITUDES for s in (1, -1)]
    for x, y in zip(w[0].double().tolist(), got):
        assert abs(y - x) == min(abs(g - x) for g in grid)
        assert nearest_index_ref(abs(Fraction(x)) / Fraction(2) ** e) == E2M1_MAGNITUDES.index(abs(y) / 2.0**e)


@settings(max_examples=60, deadline=None)
@given(finite_blocks)
def test_mse3_never_worse_than_other_rules(w: torch.Tensor) -> None:
    mse3 = quantize(w, Rule.MSE3).sq_error
    for rule in (Rule.FLOOR, Rule.EVEN, Rule.RCEIL):
        assert mse3 <= quantize(w, rule).sq_error


@settings(max_examples=40, deadline=None)
@given(finite_blocks, st.sampled_from(list(Rule)))
def test_fast_equals_reference_property(w: torch.Tensor, rule: Rule) -> None:
    q = quantize(w, rule)
    packed, scales = quantize_ref(w, rule)
    assert torch.equal(q.packed, packed) and torch.equal(q.scales, scales)


def exact_block_error(block: list[float], e: int) -> Fraction:
    """Squared error of rounding every element to its nearest point of the E2M1 grid scaled by 2^e.

    Brute force over the grid, so it clips at 6 * 2^e and is the same whichever way a tie goes.
    """
    grid = [Fraction(m) * Fraction(2) ** e for m in E2M1_MAGNITUDES]
    return sum(min((g - abs(Fraction(x))) ** 2 for g in grid) for x in block)


@settings(max_examples=60, deadline=None)
@given(finite_blocks)
def test_exponents_are_where_format_says(w: torch.Tensor) -> None:
    """FORMAT.md section 1, restated with exact arithmetic: amax = m * 2^F, m in [1, 2), E clamped to [-127, 127]."""
    block = w[0].double().tolist()
    got = {rule: int(quantize(w, rule).scales[0, 0]) - 127 for rule in Rule}
    amax = Fraction(max(abs(x) for x in block))
    if amax == 0:
        assert set(got.values()) == {-127}
        return
    f = math.frexp(float(amax))[1] - 1
    m = amax / Fraction(2) ** f
    assert 1 <= m < 2
    clamp = lambda e: max(-127, min(127, e))  # noqa: E731
    assert got[Rule.FLOOR] == clamp(f - 2)
    assert got[Rule.EVEN] == clamp(f - 2 + (m >= Fraction(7, 4)))
    r = got[Rule.RCEIL]  # the smallest E that clips nothing: 6 * 2^(E-1) < amax <= 6 * 2^E
    assert amax <= 6 * Fraction(2) ** r
    assert r == -127 or 6 * Fraction(2) ** (r - 1) < amax
    candidates = [e for e in (r - 2, r - 1, r) if e >= -127]
    errors = {e: exact_block_error(block, e) for e in candidates}
    least = min(errors.values())
    assert got[Rule.MSE3] == max(e for e in candidates if errors[e] == least)  # ties: the larger E
