"""GPTQ (Frantar et al., 2022) on the MXFP4 grid: pure tensor functions, no models, no I/O.

Each 32-column block's exponent is fixed before GPTQ starts (MSE3 on the original weights by default,
or given, e.g. imatrix exponents), so the result is an ordinary MXFP4 tensor: the on-disk format does
not change. Columns are then rounded in order to the nearest E2M1 value under their block's exponent
(qstream's rounding: ties to the even code, clamp at 6), and each column's rounding error is spread over
the columns not yet rounded through the upper Cholesky factor U of the inverse Hessian, in lazy batches
of `block` columns. The Hessian is H = sum over tokens of x x^T of the layer's inputs; its scale does not
matter (damping is relative to its mean live diagonal), so a running sum can be passed as is.

`gptq_ref.py` beside this module solves the same problem column by column with the explicit inverse
downdate of the paper's equation 3, in float64; the tests hold this fast path to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qstream.format.mxfp4 import (
    BLOCK,
    E8M0_BIAS,
    E_MAX,
    E_MIN,
    NonFiniteError,
    Quantized,
    Rule,
    dequantize,
    e2m1_index,
    pack_codes,
    quantize,
    rule_exponents,
)
from qstream.format.rules import GPTQ_DAMP as DAMP

LAZY_BLOCK = 128  # columns updated together before the rest of the matrix sees their errors


class SingularHessianError(ValueError):
    """The dampened Hessian of some batch entries (experts) is not positive definite; `bad` lists them."""

    def __init__(self, bad: list[int]) -> None:
        super().__init__(f"Hessian not positive definite after dampening for batch entries {bad[:8]}"
                         f"{' ...' if len(bad) > 8 else ''}; use statistics of more tokens or more dampening")
        self.bad = bad


def hessian_add(h: torch.Tensor, x: torch.Tensor) -> int:
    """h [in, in] += x^T x over the tokens of x [..., in]; returns how many tokens were added.

    The product is formed in x's dtype (float32 from a model is accurate for one batch) and summed into
    h, which should be float64 for a long stream of batches. diag(h) is the imatrix statistic x2_sum.
    """
    x = x.reshape(-1, x.shape[-1])
    h += (x.T @ x).to(h.dtype)
    return x.shape[0]


def hessian_add_routed(h: torch.Tensor, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """h [E, in, in] += x^T x over the tokens routed to each expert; x [T, in], experts [T, k] (top-k ids).

    Returns the tokens added per expert (int64 [E]): the routed-token counts the fallback rules use.
    """
    counts = torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
    for e in torch.unique(experts).tolist():
        rows = (experts == e).any(-1)
        counts[e] = hessian_add(h[e], x[rows])
    return counts


def dampened(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """H + damp * (mean live diagonal) * I for h [B, in, in], with 1 on the diagonal of dead channels.

    A dead input channel (never nonzero in calibration) has a zero row and column in H: GPTQ puts 1 on
    its diagonal, which decouples it, so its column is plainly rounded (GPTQ also zeroes the weights;
    rounding them is as good on the calibration data and keeps what unseen inputs would use). The mean
    is taken over live channels only, so the result does not depend on the scale of H.
    """
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag == 0
    live = (~dead).sum(-1).clamp(min=1)
    mean = torch.where(dead, 0, diag).sum(-1) / live
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    add = torch.where(dead, 1.0, damp * mean[:, None])
    return h + eye * add[:, None, :]


def nearest(x: torch.Tensor, scale: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """x rounded to the E2M1 grid times scale (a power of two; inv_scale its inverse, both broadcast to x).

    In units of the scale the grid has steps of 0.5 below 2, 1 below 4 and 2 up to 6, so rounding
    y / step half to even lands on the even code at every midpoint (0.25 -> 0, 0.75 -> 1, 1.75 -> 2,
    2.5 -> 2, 3.5 -> 4, 5 -> 4), as FORMAT.md's table says; |x| * inv_scale and y / step are exact.
    """
    y = (x.abs() * inv_scale).clamp_(max=6.0)
    step = 0.5 + 0.5 * (y >= 2) + (y >= 4)
    return torch.copysign(torch.round(y / step) * step, x) * scale


def round_to_grid(x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, values) of x rounded to the nearest E2M1 value times 2^e (e: int, x's shape): the
    rounding of `mxfp4.quantize` under a given exponent; a value that rounds to zero gets code 0, not -0."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    inv_scale = torch.ldexp(one, -e.to(x.dtype))
    q = nearest(x, torch.ldexp(one, e.to(x.dtype)), inv_scale)
    idx = e2m1_index(q.abs() * inv_scale)  # q is on the grid: exact, never a midpoint
    neg = torch.signbit(q) & (idx > 0)
    return idx | (neg.to(torch.uint8) << 3), q


def mse3_exponents(w: torch.Tensor) -> torch.Tensor:
    """The MSE3 exponents qstream would store for w [..., in] (int32 [..., in/32]): GPTQ's default grid."""
    return quantize(w, Rule.MSE3).scales.to(torch.int32) - E8M0_BIAS


def weights_and_exponents(w: torch.Tensor, exponents: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [B, out, in] and int32 exponents [B, out, in/32] (a batch of one for a 2-D weight), checked;
    exponents default to MSE3's. ValueError on shapes, NonFiniteError on NaN/Inf."""
    if w.dim() not in (2, 3):
        raise ValueError(f"weights must be [out, in] or [E, out, in], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise NonFiniteError(f"weights: {int((~torch.isfinite(w)).sum())} NaN or Inf value(s)")
    if w.shape[-1] % BLOCK:
        raise ValueError(f"input dimension {w.shape[-1]} is not a multiple of {BLOCK}")
    e = mse3_exponents(w) if exponents is None else exponents
    if tuple(e.shape) != (*w.shape[:-1], w.shape[-1] // BLOCK):
        raise ValueError(f"exponents shape {tuple(e.shape)}, need {(*w.shape[:-1], w.shape[-1] // BLOCK)}")
    if e.is_floating_point() or int(e.min()) < E_MIN or int(e.max()) > E_MAX:
        raise ValueError(f"exponents must be integers in [{E_MIN}, {E_MAX}] (scale byte - {E8M0_BIAS})")
    return (w, e.to(torch.int32)) if w.dim() == 3 else (w[None], e[None].to(torch.int32))


def hessian_batch(h: torch.Tensor) -> torch.Tensor:
    """h as [B, in, in] (a batch of one for [in, in]), checked square and finite."""
    h3 = h if h.dim() == 3 else h[None]
    if h.dim() not in (2, 3) or h3.shape[-1] != h3.shape[-2]:
        raise ValueError(f"Hessian must be [in, in] or [E, in, in], got shape {tuple(h.shape)}")
    if not torch.isfinite(h3).all():
        raise NonFiniteError(f"Hessian: {int((~torch.isfinite(h3)).sum())} NaN or Inf value(s)")
    return h3


def as_quantized(w: torch.Tensor, codes: torch.Tensor, exponents: torch.Tensor) -> Quantized:
    """Codes [..., in] and exponents [..., in/32] as qstream stores them, with the report's statistics."""
    return stored(w, pack_codes(codes), (exponents + E8M0_BIAS).to(torch.uint8))


def stored(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> Quantized:
    """Packed codes and scales of w [..., in] with the report's statistics: squared error against w, and
    blocks whose exponent is RCEIL's R of w, R-1, R-2 (below R-2: R-2)."""
    x = w.double()
    exponents = scales.to(torch.int32) - E8M0_BIAS
    r = rule_exponents(w.float().reshape(*w.shape[:-1], -1, BLOCK).abs().amax(-1), Rule.RCEIL)
    counts = torch.bincount((r - exponents).clamp(0, 2).flatten().long(), minlength=3).tolist()
    return Quantized(
        packed=packed,
        scales=scales,
        sq_error=float(((dequantize(packed, scales, torch.float32).double() - x) ** 2).sum()),
        sq_norm=float((x**2).sum()),
        offset_counts=(counts[0], counts[1], counts[2]),
    )


def column_order(h: torch.Tensor, act_order: bool) -> torch.Tensor:
    """[B, in] order in which columns are rounded: as stored, or by decreasing H diagonal (act-order,
    stable on ties). Exponents stay with their 32-column blocks either way ("static groups")."""
    b, n = h.shape[0], h.shape[-1]
    if not act_order:
        return torch.arange(n, device=h.device).expand(b, n)
    return torch.sort(torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True).indices


def permute_columns(w: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """w [B, out, in] with its input channels in `order` [B, in]."""
    return w.gather(-1, order[:, None, :].expand(w.shape))


def permute_hessian(h: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """h [B, in, in] with rows and columns in `order` [B, in]."""
    n = h.shape[-1]
    return h.gather(-2, order[:, :, None].expand(-1, n, n)).gather(-1, order[:, None, :].expand(-1, n, n))


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """U, upper with U^T U = H^-1, for dampened h [B, in, in]; SingularHessianError names failing entries."""
    low, info = torch.linalg.cholesky_ex(h)
    if bool((info == 0).all()):
        eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device).expand(h.shape)
        low, info = torch.linalg.cholesky_ex(torch.cholesky_solve(eye, low), upper=True)
    bad = torch.nonzero(info).flatten().tolist()
    if bad:
        raise SingularHessianError(bad)
    return low


@dataclass(frozen=True)
class Prepared:
    """What GPTQ needs from a Hessian, computed once per tensor (or batch of experts) and reused for
    every row chunk of it: GPTQ's rows are independent given H, so rows can be solved in any chunks."""

    u: torch.Tensor  # [B, in, in] upper factor of the dampened inverse Hessian, channels in `order`
    order: torch.Tensor  # [B, in] the order columns are rounded in


def prepare(h: torch.Tensor, *, damp: float = DAMP, act_order: bool = False,
            dtype: torch.dtype = torch.float32) -> Prepared:
    """Dampen h [in, in] (or [E, in, in]: the sum of x x^T over calibration inputs), order its channels
    and factor its inverse, in `dtype` (float64 for exact comparisons)."""
    h3 = hessian_batch(h)
    order = column_order(h3, act_order)
    return Prepared(inverse_factor(dampened(permute_hessian(h3.to(dtype), order), damp)), order)


def solve(w: torch.Tensor, prep: Prepared, exponents: torch.Tensor | None = None, *,
          block: int = LAZY_BLOCK) -> Quantized:
    """GPTQ of w [out, in] (or [E, out, in]) with a prepared Hessian under fixed block exponents
    (int [..., out, in/32], E = scale byte - 127; MSE3 on w when None), in the factor's dtype.

    Columns are held as rows of w^T, so each step reads and updates contiguous memory. Returns packed
    codes and scales exactly as qstream writes them (see `as_quantized`).
    """
    w3, e3 = weights_and_exponents(w, exponents)
    u, order = prep.u, prep.order
    b, out, n = w3.shape
    if u.shape[0] != b or u.shape[-1] != n:
        raise ValueError(f"prepared Hessian {tuple(u.shape)} does not fit weights {tuple(w.shape)}")
    xt = permute_columns(w3.to(u.dtype), order).transpose(-1, -2).contiguous()  # [B, in, out]: column j is row j
    one = torch.ones((), dtype=u.dtype, device=u.device)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        x1, u1 = xt[:, i1:i2], u[:, i1:i2, i1:i2]  # x1 is a view: updates land in xt
        e1 = e3.gather(-1, (order[:, None, i1:i2] // BLOCK).expand(b, out, i2 - i1)).transpose(-1, -2).to(u.dtype)
        scale, inv_scale = torch.ldexp(one, e1), torch.ldexp(one, -e1)
        err = torch.empty_like(x1)
        for i in range(i2 - i1):
            col = x1[:, i]
            q = nearest(col, scale[:, i], inv_scale[:, i])
            err[:, i] = (col - q) / u1[:, i, i, None]
            x1[:, i:] -= u1[:, i, i:, None] * err[:, i, None, :]
            col.copy_(q)  # the row now holds its rounded values; nothing later reads it otherwise
        xt[:, i2:] -= u[:, i1:i2, i2:].transpose(-1, -2) @ err
    q = xt.transpose(-1, -2).contiguous()
    q = torch.empty_like(q).scatter_(-1, order[:, None, :].expand(q.shape), q)
    codes = round_to_grid(q, e3.repeat_interleave(BLOCK, dim=-1))[0]  # q is on the grid: its own codes
    if w.dim() == 2:
        return as_quantized(w, codes[0], e3[0])
    return as_quantized(w, codes, e3)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, exponents: torch.Tensor | None = None, *, damp: float = DAMP,
                  block: int = LAZY_BLOCK, act_order: bool = False, dtype: torch.dtype = torch.float32) -> Quantized:
    """GPTQ of w [out, in] (or a batch of experts [E, out, in], solved in one call) with the Hessian h
    [in, in] (or [E, in, in]) under fixed block exponents: `prepare` then `solve`."""
    if h.dim() != w.dim():
        raise ValueError(f"Hessian shape {tuple(h.shape)} does not fit weights {tuple(w.shape)}")
    return solve(w, prepare(h, damp=damp, act_order=act_order, dtype=dtype), exponents, block=block)


def asymmetric_target(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """W + W (C - H) (H + damp)^-1 for w [B, out, in], h = sum x x^T and c = sum x_ref x^T [B, in, in] (float64
    sums): the weights whose outputs on the inputs x best reproduce the source's outputs on its inputs x_ref.

    In sequential GPTQ x comes from the model quantized so far and x_ref from the source model, token for token.
    ||X_ref W^T - X Q^T||^2 = ||X (W' - Q)^T||^2 + a constant when W' = W C H^-1 is the least-squares solution, so
    GPTQ on (W', H) minimizes the error against the source's outputs rather than the quantized model's (the
    asymmetric objective of GPTAQ, Li et al. 2025), with nothing changed in GPTQ itself. Written as W plus a
    correction, dampening shrinks only the correction: W C (H + damp)^-1 would shrink W itself along H's weak
    directions even where x_ref = x (measured on SmolLM2: it lost to plain GPTQ by a third). Dead channels (zero
    in H) keep their weights, as in GPTQ; so does every weight of an entry whose dampened H cannot be factored."""
    low, info = torch.linalg.cholesky_ex(dampened(h.double(), damp))
    diff = c.double() - h.double()
    step = torch.cholesky_solve((w.double() @ diff).transpose(-1, -2), low).transpose(-1, -2)  # H symmetric
    keep = (torch.diagonal(h, dim1=-2, dim2=-1) == 0) | (info != 0)[:, None]
    return torch.where(keep[:, None, :], w.double(), w.double() + step).to(w.dtype)


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """||(w - wq) X||^2 = trace(D H D^T), D = w - wq, in float64: the error GPTQ minimizes (per batch entry)."""
    d = (w.double() - wq.double())
    return ((d @ h.double()) * d).sum((-2, -1))
