"""How sequential GPTQ solves what it gathered: its settings, and pure functions from weights and Hessians to
stored codes, scales and the case each module was solved by (qstream.calib.sequential runs them per layer in the
engine; qstream.calib.group_tasks in Ray tasks). No models, no engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from qstream.calib.calibrate import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from qstream.calib.gptq import DAMP, LAZY_BLOCK, Prepared, SingularHessianError, asymmetric_target, prepare, solve
from qstream.calib.hessians import UP, Target
from qstream.calib.imatrix import DEPTH, quantize_weighted
from qstream.calib.stats import EXPERT_INDEX
from qstream.common import CHUNK_ELEMENTS, row_chunks
from qstream.engine.hidden import DEFAULT_BUDGET
from qstream.engine.run import DEFAULT_BATCH_TOKENS
from qstream.format.mxfp4 import E8M0_BIAS, dequantize, quantize
from qstream.format.rules import BLOCK, Rule
from qstream.io.checkpoint import CheckpointTensor
from qstream.planning.plan import Plan

CASES = ("gptq", "gptq-all-tokens", "imatrix", "mse3")  # how a module was solved, by its stored code
OWN, ALL_TOKENS, IMATRIX, MSE3 = range(len(CASES))
Solved = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # modules' packed, scales, case (solve_modules)
# a results layer file's entries (qstream.calib.sequential): per source tensor N, and ROUTED per experts module
PACKED, SCALES, CASE, ROUTED = ":packed", ":scales", ":case", ":routed"


@dataclass(frozen=True)
class GptqSettings:
    """How to calibrate and solve. `min_tokens` 0: an expert needs as many routed tokens as its input width."""

    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    damp: float = DAMP
    block: int = LAZY_BLOCK
    act_order: bool = True  # columns by decreasing Hessian diagonal, exponents staying with their blocks (measured)
    asymmetric: bool = False  # against the source model's outputs: measured worse on SmolLM2 (bench/NOTES.md)
    fit_down: bool = True  # down projections against their source MLP's outputs (calib.hessians): measured better
    depth: int = DEPTH
    min_tokens: int = 0
    dtype: str = "auto"
    device: str = "auto"
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    hidden_budget: int = DEFAULT_BUDGET
    hessian_budget: int = 0  # 0: HESSIAN_BUDGET on the CPU, a share of the free memory on CUDA

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("device", "hidden_budget", "hessian_budget")}


def solve_modules(w: torch.Tensor, h: torch.Tensor, tokens: torch.Tensor, s: GptqSettings,
                  own: torch.Tensor | None = None, c: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Modules w [B, out, in] with Hessians h [B, in, in] over tokens [B] -> packed, scales, case int8 [B].

    Each module's exponents are the imatrix choice under diag(h) / tokens; GPTQ then rounds its columns. `own`
    [B] bool: the Hessian is the module's own tokens' (else all tokens': a starved expert). `c` [B, in, in]: the
    cross terms with the source model's inputs: GPTQ then rounds the weights that best serve the source's outputs
    (`asymmetric_target`), under the exponents chosen for the source weights. No tokens: mse3; a Hessian GPTQ
    cannot factor: the imatrix choice alone."""
    w_src = w
    if c is not None:
        w = asymmetric_target(w, h, c, s.damp)
    b, out, n = w.shape
    packed = torch.empty(b, out, n // 2, dtype=torch.uint8)
    scales = torch.empty(b, out, n // BLOCK, dtype=torch.uint8)
    case = torch.full((b,), MSE3, dtype=torch.int8)
    live = [i for i in range(b) if int(tokens[i]) > 0]
    for i in range(b):
        if i not in live:
            q = quantize(w_src[i], Rule.MSE3)
            packed[i], scales[i] = q.packed.cpu(), q.scales.cpu()
    if not live:
        return packed, scales, case
    exps, weighted = [], []
    for i in live:  # exponents from the source weights: within R-2..R of each block, as verify holds them
        a = torch.diagonal(h[i]) / int(tokens[i])
        q = quantize_weighted(w_src[i], a.to(w.device).clamp(min=0))
        weighted.append(q)
        exps.append(q.scales.to(torch.int32) - E8M0_BIAS)
    sel = torch.tensor(live)
    prep: Prepared | None
    try:
        bad: list[int] = []
        prep = prepare(h if len(live) == b else h[sel.to(h.device)], damp=s.damp, act_order=s.act_order)
    except SingularHessianError as exc:
        bad = exc.bad
        keep = [k for k in range(len(live)) if k not in bad]
        prep = prepare(h[sel[keep].to(h.device)], damp=s.damp, act_order=s.act_order) if keep else None
    good = [k for k in range(len(live)) if k not in bad]
    if good and prep is not None:
        q = solve(w[sel[good].to(w.device)].float(), prep, torch.stack([exps[k] for k in good]), block=s.block)
        for j, k in enumerate(good):
            i = live[k]
            packed[i], scales[i] = q.packed[j].cpu(), q.scales[j].cpu()
            case[i] = OWN if own is None or bool(own[i]) else ALL_TOKENS
    for k in bad:
        i = live[k]
        packed[i], scales[i] = weighted[k].packed.cpu(), weighted[k].scales.cpu()
        case[i] = IMATRIX
    return packed, scales, case


def expert_groups(n_experts: int, widths: list[int], budget: int, workers: int, sums: int = 1) -> list[list[int]]:
    """Experts in groups whose Hessians (float64 totals, a float32 partial per batch in flight; `sums` 2: the
    cross terms too) fit `budget`."""
    per_expert = sum(w * w for w in widths) * (8 + 4 * workers) * sums
    size = max(1, min(n_experts, budget // max(1, per_expert)))
    return [list(range(a, min(a + size, n_experts))) for a in range(0, n_experts, size)]


def solve_group(plan: Plan, s: GptqSettings, t: Target, group: list[int], starved: frozenset[int]
                ) -> dict[str, Solved]:
    """Each source of experts target `t` (its Hessians gathered for `group`): the group's experts' packed, scales
    and cases, by source name. A starved expert's gate/up take the all-token Hessian `t.h_all` (and `t.c_all`).
    Cross terms: gate/up's with the reference stream, down's from a fit pass (calib.hessians)."""
    if t.h is None or t.tokens is None:
        raise ValueError(f"{t.param}: no Hessians gathered for experts {group}")
    h, tokens = t.h, t.tokens
    c = t.c if t.c is not None and t.cross else None
    own = torch.tensor([e not in starved for e in group])
    patched = [slot for slot, e in enumerate(group) if e in starved] if t.kind == UP else []
    if patched:  # on copies: t keeps the sums as gathered (a group's Hessians are the largest tensors of a solve)
        h, tokens, c = h.clone(), tokens.clone(), None if c is None else c.clone()
        for slot in patched:
            h[slot], tokens[slot] = t.h_all, t.tokens_all  # type: ignore[assignment]
            if c is not None:
                c[slot] = t.c_all  # type: ignore[assignment]
    whole = list(range(len(group)))
    out: dict[str, Solved] = {}
    for name in t.sources:
        src = plan.source.tensors[name]
        shape = src.info.shape
        m = EXPERT_INDEX.search(name) if len(shape) == 2 else None
        if m is not None:  # one expert's own weight
            e = int(m[1])
            if e not in group:
                continue
            slot = group.index(e)
            sel = [slot]
            w = read_float(src, 0, shape[0], h.device)[None]
        elif len(shape) == 3 and shape[0] == t.experts:
            sel = whole
            w = read_float(src, group[0] * shape[1], (group[-1] + 1) * shape[1], h.device).reshape(len(group),
                                                                                                  *shape[1:])
        else:
            continue  # a layout the Hessians do not fit: _plain later
        if w.shape[-1] != t.width:
            continue
        if sel == whole:  # all of them, as they are: h[sel] would copy every Hessian of the group
            out[name] = solve_modules(w, h, tokens, s, own, c)
        else:
            out[name] = solve_modules(w, h[sel], tokens[sel], s, own[sel], None if c is None else c[sel])
    return out


def read_float(src: CheckpointTensor, r0: int, r1: int, device: torch.device) -> torch.Tensor:
    """Rows [r0, r1) of a source weight as float32 on `device`, read CHUNK_ELEMENTS at a time: a group of 256
    experts is 1.5 GiB of bf16, which the host never holds at once when the solve runs on the GPU."""
    cols = src.info.row_shape[1]
    out = torch.empty(r1 - r0, cols, dtype=torch.float32, device=device)
    for a, b in row_chunks(r1 - r0, cols, CHUNK_ELEMENTS):
        out[a:b] = src.read_rows(r0 + a, r0 + b).to(device)
    return out


def dequantized(keys: Iterable[str], entry: Callable[[str], torch.Tensor], plan: Plan, dtype: torch.dtype,
                device: torch.device) -> dict[str, torch.Tensor]:
    """The values of the source tensors a layer file's `keys` hold (N:packed with N:scales; other keys ignored),
    fetched one tensor at a time by `entry`, in their stored shapes."""
    names = [k.removesuffix(PACKED) for k in keys if k.endswith(PACKED)]
    return {n: _dense(entry(n + PACKED), entry(n + SCALES), dtype, device).reshape(plan.source.tensors[n].info.shape)
            for n in names}


def _dense(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Stored codes and scales [rows, ...] as `dtype` values on `device`, decoded in row chunks (decoding holds a
    few times the output's size in temporaries)."""
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype, device=device)
    for a, b in row_chunks(out.shape[0], out.shape[1], CHUNK_ELEMENTS):
        out[a:b] = dequantize(packed[a:b].to(device), scales[a:b].to(device), dtype)
    return out
