"""The reference GPTQ: slow, column by column, float64, from the paper's equations rather than its tricks.

After column j is rounded, its error is spread over the remaining columns with row j of the inverse
Hessian of the columns not yet rounded, and that inverse is then downdated explicitly (Frantar et al.,
eq. 3: H^-1 - H^-1[:, j] H^-1[j, :] / H^-1[j, j]). The fast path (`gptq.gptq_quantize`) reaches the same
updates through a Cholesky factor in lazy batches; the tests hold it to this one. Small tensors only.
"""

from __future__ import annotations

import torch

from qstream.calib.gptq import (
    DAMP,
    as_quantized,
    column_order,
    dampened,
    hessian_batch,
    permute_columns,
    permute_hessian,
    round_to_grid,
    weights_and_exponents,
)
from qstream.format.mxfp4 import BLOCK, Quantized


def gptq_reference(w: torch.Tensor, h: torch.Tensor, exponents: torch.Tensor | None = None, *,
                   damp: float = DAMP, act_order: bool = False) -> Quantized:
    """GPTQ of one weight w [out, in] under fixed exponents [out, in/32] (MSE3 when None), in float64."""
    if w.dim() != 2:
        raise ValueError(f"the reference takes one [out, in] weight, got shape {tuple(w.shape)}")
    w3, e3 = weights_and_exponents(w, exponents)
    h3 = hessian_batch(h).double()
    if h3.shape != (1, w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not fit weights {tuple(w.shape)}")
    order = column_order(h3, act_order)
    hinv = torch.linalg.inv(dampened(permute_hessian(h3, order), damp)[0])
    x, order, e = permute_columns(w3.double(), order)[0], order[0], e3[0]
    codes = torch.empty(x.shape, dtype=torch.uint8)
    for j in range(x.shape[1]):
        codes[:, order[j]], q = round_to_grid(x[:, j], e[:, order[j] // BLOCK])
        err = (x[:, j] - q) / hinv[j, j]
        x[:, j:] -= err[:, None] * hinv[None, j, j:]
        hinv = hinv - hinv[:, j, None] * hinv[None, j, :] / hinv[j, j]
    return as_quantized(w, codes, e)
