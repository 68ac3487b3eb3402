"""The MXFP4 block size and the exponent rules, as plain tables without torch.

The CLI builds its `--rule` choices and help from `Rule` without importing torch; the numerics
(`mxfp4`, `mxfp4_ref`, the kernels) import the same enum from here.
"""

from __future__ import annotations

import enum

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
    def doc(self) -> str:
        return _RULE_DOCS[self]


_RULE_DOCS = {
    Rule.FLOOR: "E = floor(log2 amax) - 2; clips above 6*2^E",
    Rule.EVEN: "E = floor(log2 amax) - 2, +1 if mantissa >= 1.75",
    Rule.RCEIL: "E = ceil(log2(amax/6)); never clips",
    Rule.MSE3: "least squared error of {R-2, R-1, R}, R = rceil",
}
