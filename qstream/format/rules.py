"""The MXFP4 block size and the exponent rules, one table: name, formula, kernel code, candidates searched;
and the methods (data-free rule, or imatrix from calibration statistics), one table too.

Plain tables without torch: the CLI builds its `--rule` choices and help from them without importing torch.

Every path reads this table: the torch path (`mxfp4.quantize`) and the reference (`mxfp4_ref`) for the
candidates, the C kernel through -D defines its build passes (`kernels/cpu.py`), the Triton kernel for
the code and whether MSE3's R-2 candidate is computed. CLI help, the plan and the model card print `doc`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

BLOCK = 32  # elements per MXFP4 block: one shared E8M0 scale


class Rule(str, enum.Enum):
    """How a block's exponent E is chosen; amax = m * 2^F with m in [1, 2)."""

    FLOOR = "floor"
    """E = F - 2 (OCP reference, ggml, torchao): values above 6 * 2^E clip to 6."""
    EVEN = "even"
    """E = F - 2, plus 1 when m >= 1.75 (compressed-tensors, llm-compressor, Quark)."""
    RCEIL = "rceil"
    """E = ceil(log2(amax / 6)), the smallest E that clips nothing (gpt-oss, ModelOpt)."""
    MSE3 = "mse3"
    """Of {R-2, R-1, R} (R = RCEIL's E), the one with least block squared error; ties take the larger E."""

    @property
    def spec(self) -> RuleSpec:
        return RULES[self]

    @property
    def doc(self) -> str:
        return RULES[self].doc


@dataclass(frozen=True)
class RuleSpec:
    """One rule's row. `candidates` are the offsets s (E = R - s, R = RCEIL's E) a searching rule is defined
    over, which the reference compares; `searched` those the fast paths compare, always 0..n-1."""

    doc: str  # the formula in one line
    code: int  # what the C and Triton kernels switch on
    candidates: tuple[int, ...] = ()
    searched: tuple[int, ...] = ()


# The offsets the fast paths search for MSE3. R-2 never wins: in units of 2^R the block maximum y lies in
# (3, 6], and R-2 clips it to 1.5, costing (y - 1.5)^2 >= 2.25 (>= 6.25 for y > 4), while R's error on it
# is at most (y - 3)^2 <= 0.25 (at most 1 for y > 4) and on each of the 31 other elements R-2 saves at
# most 1/16 over R (its grid is finer only below 1.5, where R's half-step is 1/4):
# e(R) - e(R-2) <= 0.25 + 31/16 - 2.25 < 0. The reference still searches all three, and the tests hold
# every fast path to it.
RULES: dict[Rule, RuleSpec] = {
    Rule.FLOOR: RuleSpec("E = floor(log2 amax) - 2; clips above 6*2^E", 0),
    Rule.EVEN: RuleSpec("E = floor(log2 amax) - 2, +1 if mantissa >= 1.75", 1),
    Rule.RCEIL: RuleSpec("E = ceil(log2(amax/6)); never clips", 2),
    Rule.MSE3: RuleSpec("least squared error of {R-2, R-1, R}, R = rceil", 3, candidates=(0, 1, 2), searched=(0, 1)),
}
assert all(s.searched == tuple(range(len(s.searched))) for s in RULES.values())  # the kernels count from 0


class Method(str, enum.Enum):
    """How the exponents are chosen: from the weights alone by --rule, or also from calibration statistics."""

    RTN = "rtn"
    IMATRIX = "imatrix"
    GPTQ = "gptq"

    @property
    def doc(self) -> str:
        return METHODS[self]


# Read by the CLI (`--method` choices and help), the report (an imatrix run records it as its rule) and verify.
METHODS: dict[Method, str] = {
    Method.RTN: "each block's exponent by --rule from the weights alone",
    Method.IMATRIX: "per block, the exponent of least activation-weighted squared error, from calibration "
                    "statistics (--calib); modules without statistics use mse3",
    Method.GPTQ: "sequential GPTQ through the layer-streaming engine: block exponents by the imatrix choice, then "
                 "each column rounded with the inverse-Hessian error update (each expert with its own tokens)",
}
# GPTQ's dampening: this share of the mean live Hessian diagonal is added to the diagonal. 0.1, not the paper's 0.01:
# chosen on SmolLM2 validation windows disjoint from calibration and evaluation (bench/NOTES.md).
GPTQ_DAMP = 0.1


def c_defines() -> tuple[str, ...]:
    """The table as C compiler flags: RULE_<NAME>=code per rule, MSE3_SEARCHED=number of candidates."""
    return (*(f"-DRULE_{r.name}={s.code}" for r, s in RULES.items()),
            f"-DMSE3_SEARCHED={len(RULES[Rule.MSE3].searched)}")
