"""Per-input-channel activation statistics of quantizable weights, gathered while the engine runs a layer.

For every source weight a preset could quantize (qstream.planning.selection's all-linear set, routed experts included)
this keeps, under the weight's source name N (the STATS contract, notes in README):
  N:x2_sum  float64 [in] (2-D weight) or [E, in] (fused experts): sum over tokens of x_j^2 of its input
  N:tokens  int64 [] or [E]: tokens that contributed
  N:routed  int64 [] or [E], routed experts only: tokens the router sent to the expert
A Linear's input is caught by a forward pre-hook. A fused experts module (transformers' experts interface:
`gate_up_proj`/`up_proj` and `down_proj` [E, ...], `_apply_gate`) is caught with its routing; in `all` mode
every expert also computes its gate/up projection and gating on every token, so its down projection gets the
statistics of all tokens, while the layer's own forward keeps the true routing for its output. In `routed`
mode an expert sees only the tokens routed to it. Experts are batched: in `all` mode a group of experts'
gate/up projections is one product, in `routed` mode the routed rows are sorted by expert once and go through
one grouped product; their sums over a batch's tokens are float32 (exact squares of bf16 inputs), so they differ
from the one-expert-at-a-time float64 reference `down_input` in the last bits. Each batch sums into its own
float64 partials, which are added in batch order whichever thread ran the batch: the same bytes run to run.
"""

from __future__ import annotations

import inspect
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qstream.engine.model import StreamedModel
from qstream.io.safetensors_io import DTYPE_NAMES, OutEntry, ShardWriter

X2, TOKENS, ROUTED = "x2_sum", "tokens", "routed"
EXPERT_MODES = ("all", "routed")
EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
GROUP_BYTES_CUDA, GROUP_BYTES_CPU = 256 << 20, 4 << 20  # batched experts' intermediate (down_input_sums)


def x2_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over rows of x^2 per column, float64: [n, in] -> [in]."""
    return x.double().square().sum(0)


@dataclass
class _Acc:
    """Sums for one input: x2 [in] or [E, in], tokens [] or [E], routed ([E]) for experts."""

    x2: torch.Tensor
    tokens: torch.Tensor
    routed: torch.Tensor | None = None

    def zeros(self) -> _Acc:
        return _Acc(torch.zeros_like(self.x2), torch.zeros_like(self.tokens),
                    None if self.routed is None else torch.zeros_like(self.routed))

    def add(self, other: _Acc) -> None:
        self.x2 += other.x2
        self.tokens += other.tokens
        if self.routed is not None and other.routed is not None:
            self.routed += other.routed


@dataclass
class _Target:
    """A model parameter whose input is watched, and the source tensors it was loaded from."""

    param: str
    sources: list[str]
    total: _Acc
    experts: int = 0  # > 0: a fused experts parameter [E, ...]


def experts_module(name: str) -> tuple[str, int | None]:
    """A routed expert weight's experts module, and its expert index when the weight is one expert's own:
    `...mlp.experts.gate_up_proj` -> (`...mlp.experts`, None); `...experts.3.w1.weight` -> (`...experts`, 3)."""
    m = EXPERT_INDEX.search(name)
    if m is not None:
        return name[:m.start()] + ".experts", int(m[1])
    return name.rpartition(".")[0], None


def layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


class Collector:
    """An engine Observer: hooks on the live layer's Linears and experts, one file per finished layer.

    `wanted`: source tensor names to keep statistics for, with their shapes as the plan sees them.
    """

    def __init__(self, wanted: dict[str, tuple[int, ...]], experts: str, out_dir: Path) -> None:
        if experts not in EXPERT_MODES:
            raise ValueError(f"experts mode {experts!r}: choose one of {EXPERT_MODES}")
        self.wanted, self.experts, self.out_dir = wanted, experts, Path(out_dir)
        self._targets: list[_Target] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._local = threading.local()  # .partial: the running batch's sums, by id of target
        self._lock = threading.Lock()
        self._finished: dict[int, dict[int, _Acc]] = {}  # batches done but not yet added
        self._next = 0  # the next batch to add

    # ---- Observer -----------------------------------------------------------------------------------

    def layer_begin(self, model: StreamedModel, index: int) -> None:
        path = model.layer_path(index)
        dev = model.device
        for name, module in model.layers[index].named_modules(prefix=path):
            if isinstance(module, nn.Linear):
                zero = _Acc(torch.zeros(module.in_features, dtype=torch.float64, device=dev),
                            torch.zeros((), dtype=torch.int64, device=dev))
                t = self._target(model, f"{name}.weight", zero)
                if t is not None:
                    self._handles.append(module.register_forward_pre_hook(self._linear_hook(t)))
            elif _is_experts(module):
                self._watch_experts(model, name, module)

    def batch_begin(self, batch: int) -> None:
        self._local.partial = {}

    def batch_end(self, batch: int) -> None:
        """Keep this batch's sums; add every finished batch in order, so the totals never depend on timing."""
        with self._lock:
            self._finished[batch] = self._local.partial
            by_id = {id(t): t for t in self._targets}
            while self._next in self._finished:
                for key, acc in self._finished.pop(self._next).items():
                    by_id[key].total.add(acc)
                self._next += 1

    def layer_end(self, model: StreamedModel, index: int) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._finished:
            raise RuntimeError(f"layer {index}: batches {sorted(self._finished)} finished after a missing one")
        self._next = 0
        tensors: dict[str, torch.Tensor] = {}
        for t in self._targets:
            tensors.update(self._per_source(t))
        self._targets.clear()
        write_atomic(self.out_dir / layer_file(index), tensors)

    # ---- hooks --------------------------------------------------------------------------------------

    def _target(self, model: StreamedModel, param: str, acc: _Acc, experts: int = 0) -> _Target | None:
        sources = [s for s in model.sources_of(param) if s in self.wanted]
        if not sources:
            return None
        t = _Target(param, sources, acc, experts)
        self._targets.append(t)
        return t

    def _acc(self, t: _Target) -> _Acc:
        """The running batch's sums for `t`."""
        partial = self._local.partial
        if id(t) not in partial:
            partial[id(t)] = t.total.zeros()
        return partial[id(t)]

    def _linear_hook(self, t: _Target) -> Callable:
        def hook(module: nn.Linear, args: tuple) -> None:
            x = args[0].reshape(-1, module.in_features)
            acc = self._acc(t)
            acc.x2 += x2_sum(x)
            acc.tokens += x.shape[0]
        return hook

    def _watch_experts(self, model: StreamedModel, name: str, experts: Any) -> None:
        up_name, n_exp, hidden, inner = experts_dims(experts)

        def acc(width: int) -> _Acc:
            z = torch.zeros(n_exp, dtype=torch.int64, device=model.device)
            return _Acc(torch.zeros(n_exp, width, dtype=torch.float64, device=model.device), z, z.clone())

        t_up = self._target(model, f"{name}.{up_name}", acc(hidden), n_exp)
        t_down = self._target(model, f"{name}.down_proj", acc(inner), n_exp)
        if t_up is None and t_down is None:
            return

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._expert_stats(module, *experts_inputs(module, args, kwargs), t_up, t_down)

        self._handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))

    def _expert_stats(self, experts: Any, x: torch.Tensor, index: torch.Tensor,
                      t_up: _Target | None, t_down: _Target | None) -> None:
        """One batch: routed counts, then every expert's inputs over all tokens (`all`) or its own (`routed`).
        Experts are batched (`down_input_sums`, `routed_sums`); each batch's sums go into its float64 partials
        once."""
        n_exp = (t_up or t_down).experts  # type: ignore[union-attr]
        up, down = (None if t is None else self._acc(t) for t in (t_up, t_down))
        routed = torch.bincount(index.reshape(-1), minlength=n_exp)[:n_exp]
        for acc in (up, down):
            if acc is not None:
                acc.routed += routed  # type: ignore[operator]
        if self.experts == "all":
            if up is not None:  # the same input for every expert's gate/up projection
                up.x2 += x2_sum(x)
                up.tokens += x.shape[0]
            if down is not None:
                down.x2 += down_input_sums(experts, x, group_bytes(x.device))
                down.tokens += x.shape[0]
            return
        up_x2, down_x2 = routed_sums(experts, x, index, up is not None, down is not None)
        for acc, x2 in ((up, up_x2), (down, down_x2)):
            if acc is not None and x2 is not None:
                acc.x2 += x2
                acc.tokens += routed

    # ---- results ------------------------------------------------------------------------------------

    def _per_source(self, t: _Target) -> dict[str, torch.Tensor]:
        """The target's sums under each source's name, in the source's shape ([in] or fused [E, in])."""
        x2, tokens, routed = (v.cpu() if v is not None else None for v in (t.total.x2, t.total.tokens, t.total.routed))
        out: dict[str, torch.Tensor] = {}
        for s in t.sources:
            shape = self.wanted[s]
            if t.experts and len(shape) == 2:  # one expert's own 2-D weight
                m = EXPERT_INDEX.search(s)
                if m is None:
                    raise RuntimeError(f"{s}: a per-expert weight without an expert index in its name")
                e = int(m[1])
                parts = (x2[e], tokens[e], routed[e])  # type: ignore[index]
            else:
                parts = (x2, tokens, routed)
            if parts[0].shape[-1] != shape[-1]:
                raise RuntimeError(f"{s}: input width {shape[-1]}, its module saw {parts[0].shape[-1]}")
            out[f"{s}:{X2}"] = parts[0].clone()
            out[f"{s}:{TOKENS}"] = parts[1].clone()
            if t.experts:
                out[f"{s}:{ROUTED}"] = parts[2].clone()
        return out


def experts_dims(experts: Any) -> tuple[str, int, int, int]:
    """A fused experts module's gate/up parameter name, expert count, and the input widths of its gate/up
    (hidden) and down (intermediate) projections, whether they are stored [E, out, in] or transposed."""
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    col = 1 if experts.is_transposed else 2
    return up_name, experts.down_proj.shape[0], getattr(experts, up_name).shape[col], experts.down_proj.shape[col]


def experts_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens [n, hidden] and their routed experts' indices [n, top_k] of a fused experts module's call, as a
    forward pre-hook with kwargs sees it: models pass them by position or by name, and name them differently."""
    hidden, index = list(inspect.signature(type(module).forward).parameters)[1:3]
    bound = dict(zip((hidden, index), args)) | kwargs
    x = bound[hidden].reshape(-1, bound[hidden].shape[-1])
    return x, bound[index].reshape(x.shape[0], -1)


def _is_experts(module: nn.Module) -> bool:
    """transformers' fused experts interface (use_experts_implementation): [E, ...] projections and a gate."""
    down = getattr(module, "down_proj", None)
    return hasattr(module, "has_gate") and isinstance(down, torch.Tensor) and down.dim() == 3


def up_params(experts: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fused experts module's gate/up weight [E, ...] and its bias (None without one), as it holds them now."""
    if experts.has_gate:
        return experts.gate_up_proj, experts.gate_up_proj_bias if experts.has_bias else None
    return experts.up_proj, experts.up_proj_bias if experts.has_bias else None


def down_input(experts: Any, e: int, x: torch.Tensor,
               up: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """What expert e's down projection receives for tokens x [n, hidden]: its gate/up projection then its own
    gating (`_apply_gate`, or the activation alone for ungated experts), as transformers' experts compute it.
    One expert at a time: the plain reference that the batched `down_input_sums` is held to. `up`: gate/up weights
    and bias in the module's layout (`up_params`) to use instead of the module's own."""
    w_all, bias = up or up_params(experts)
    w = w_all[e]
    h = x @ w if experts.is_transposed else x @ w.T
    if bias is not None:
        h = h + bias[e]
    return experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)


def group_bytes(device: torch.device) -> int:
    """The budget of one batched product's output ([experts, tokens, 2 x inner] in float32): large on a GPU,
    where fewer, larger products pay; small on the CPU, where every worker thread holds one."""
    return GROUP_BYTES_CUDA if device.type == "cuda" else GROUP_BYTES_CPU


def down_input_sums(experts: Any, x: torch.Tensor, budget: int) -> torch.Tensor:
    """Sum over tokens of the squared down-projection input of every expert on every token x [n, hidden]:
    float32 [E, inner]. Experts go in groups whose gate/up output fits `budget` bytes at 4 bytes an element
    (one expert at least): one product for the group (a single [n, hidden] x [hidden, G * out] GEMM for
    [E, out, hidden] weights, a batched one for transposed [E, hidden, out]), then the experts' own gating on
    it (transformers' `_apply_gate` and activations act on the last dimension), then the float32 sum over
    tokens."""
    w = experts.gate_up_proj if experts.has_gate else experts.up_proj
    bias = (experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias) if experts.has_bias else None
    n_exp, width = w.shape[0], w.shape[2] if experts.is_transposed else w.shape[1]
    step = max(1, budget // max(1, x.shape[0] * width * 4))
    parts = []
    for g in range(0, n_exp, step):
        wg, bg = w[g:g + step], None if bias is None else bias[g:g + step]
        if experts.is_transposed:  # [G, n, out]
            h = torch.matmul(x, wg) if bg is None else torch.matmul(x, wg) + bg[:, None, :]
        else:  # [n, G, out]
            h = F.linear(x, wg.reshape(-1, wg.shape[-1]), None if bg is None else bg.reshape(-1))
            h = h.view(x.shape[0], len(wg), width)
        a = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
        parts.append(square_sums(a, 1 if experts.is_transposed else 0))
    return torch.cat(parts)


def square_sums(a: torch.Tensor, dim: int) -> torch.Tensor:
    """Float32 sums of the squares of `a` along `dim`. On CUDA one reduction reads `a` as it is (a norm, squared:
    within a few float32 ulps of the plain sum), with no float32 copy of it: all-experts statistics are bound by
    this memory traffic (20% faster per batch at 35B shapes on an H200). Elsewhere the float32 copy, squared and
    summed: torch's CPU norm accumulates less accurately (1e-5)."""
    if a.is_cuda:
        return torch.linalg.vector_norm(a, 2, dim, dtype=torch.float32).square()
    return a.float().square().sum(dim)


def routed_sums(experts: Any, x: torch.Tensor, index: torch.Tensor, up: bool, down: bool
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Sums over each expert's routed tokens of x^2 (its gate/up input) and of its down projection's input,
    float32 [E, hidden] and [E, inner] (None where not asked). No loop over experts: the routed rows, sorted by
    expert, go through one grouped product (`F.grouped_mm`) and the experts' own gating; the per-expert sums are
    products with 0/1 routing matrices (exact products, float32 accumulation at torch's default matmul precision,
    which qstream never lowers; no atomics: the same bits run to run). One device sync per call (the row count)."""
    n_exp = experts.down_proj.shape[0]
    n, k = index.shape
    flat = index.reshape(-1).long()
    flat = torch.where(flat < n_exp, flat, n_exp)  # an index past the experts (padding) routes nowhere
    up_x2 = down_x2 = None
    if up:
        routing = torch.zeros(n, n_exp + 1, dtype=torch.float32, device=x.device)  # tokens x experts, 0/1
        routing.scatter_add_(1, flat.view(n, k), torch.ones(n, k, dtype=torch.float32, device=x.device))
        up_x2 = routing[:, :n_exp].T @ x.float().square()
    if down:
        counts = torch.bincount(flat, minlength=n_exp + 1)[:n_exp]
        order = torch.argsort(flat, stable=True)[:int(counts.sum())]  # the sync: padding slots sort last
        inner = experts.down_proj.shape[1 if experts.is_transposed else 2]
        down_x2 = torch.zeros(n_exp, inner, dtype=torch.float32, device=x.device)
        if len(order):
            expert_of_row = flat[order]
            h = _grouped_up(experts, x[order // k], counts, expert_of_row)
            a = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
            member = expert_of_row[None, :] == torch.arange(n_exp, device=x.device)[:, None]  # experts x rows
            down_x2 = member.to(torch.float32) @ a.float().square()
    return up_x2, down_x2


def _grouped_up(experts: Any, xs: torch.Tensor, counts: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
    """The gate/up projection of rows xs sorted by expert (counts[e] rows for expert e): one grouped product."""
    w, bias = up_params(experts)
    h = F.grouped_mm(xs, w if experts.is_transposed else w.transpose(1, 2),
                     offs=counts.cumsum(0).to(torch.int32))
    return h if bias is None else h + bias[expert_of_row]


def write_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file that appears complete or not at all, written tensor by tensor from their own memory
    (safetensors' save_file first copies every tensor into bytes: a second copy of a 35B-shaped layer's results)."""
    partial = path.with_name(path.name + ".partial")
    names = sorted(tensors)
    entries = [OutEntry(k, DTYPE_NAMES[tensors[k].dtype], tuple(tensors[k].shape)) for k in names]
    with ShardWriter(partial, entries) as w:
        for k in names:
            w.write(k, tensors[k])
    os.replace(partial, path)
