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
mode an expert sees only the tokens routed to it. Each batch sums into its own float64 partials, which are
added in batch order whichever thread ran the batch: the same bytes run to run.
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
from safetensors.torch import save_file
from torch import nn

from qstream.engine.model import StreamedModel

X2, TOKENS, ROUTED = "x2_sum", "tokens", "routed"
EXPERT_MODES = ("all", "routed")
EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


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
        up_name = "gate_up_proj" if experts.has_gate else "up_proj"
        up, down = getattr(experts, up_name), experts.down_proj
        n_exp = up.shape[0]
        hidden = up.shape[1] if experts.is_transposed else up.shape[2]
        inner = down.shape[1] if experts.is_transposed else down.shape[2]

        def acc(width: int) -> _Acc:
            z = torch.zeros(n_exp, dtype=torch.int64, device=model.device)
            return _Acc(torch.zeros(n_exp, width, dtype=torch.float64, device=model.device), z, z.clone())

        t_up = self._target(model, f"{name}.{up_name}", acc(hidden), n_exp)
        t_down = self._target(model, f"{name}.down_proj", acc(inner), n_exp)
        if t_up is None and t_down is None:
            return
        params = list(inspect.signature(type(experts).forward).parameters)[1:4]  # hidden, indices, weights

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            bound = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
            x = bound[params[0]].reshape(-1, hidden)
            index = bound[params[1]].reshape(x.shape[0], -1)
            self._expert_stats(module, x, index, t_up, t_down)

        self._handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))

    def _expert_stats(self, experts: Any, x: torch.Tensor, index: torch.Tensor,
                      t_up: _Target | None, t_down: _Target | None) -> None:
        """One batch: routed counts, then every expert's inputs over all tokens (`all`) or its own."""
        n_exp = (t_up or t_down).experts  # type: ignore[union-attr]
        up, down = (None if t is None else self._acc(t) for t in (t_up, t_down))
        routed = torch.bincount(index.reshape(-1), minlength=n_exp)[:n_exp]
        everyone = self.experts == "all"
        for acc in (up, down):
            if acc is not None:
                acc.routed += routed  # type: ignore[operator]
        if everyone and up is not None:  # the same input for every expert's gate/up projection
            up.x2 += x2_sum(x)
            up.tokens += x.shape[0]
        for e in range(n_exp):
            xe = x if everyone else x[(index == e).any(-1)]
            if xe.shape[0] == 0:
                continue
            if up is not None and not everyone:
                up.x2[e] += x2_sum(xe)
                up.tokens[e] += xe.shape[0]
            if down is not None:
                down.x2[e] += x2_sum(down_input(experts, e, xe))
                down.tokens[e] += xe.shape[0]

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


def _is_experts(module: nn.Module) -> bool:
    """transformers' fused experts interface (use_experts_implementation): [E, ...] projections and a gate."""
    down = getattr(module, "down_proj", None)
    return hasattr(module, "has_gate") and isinstance(down, torch.Tensor) and down.dim() == 3


def down_input(experts: Any, e: int, x: torch.Tensor) -> torch.Tensor:
    """What expert e's down projection receives for tokens x [n, hidden]: its gate/up projection then its own
    gating (`_apply_gate`, or the activation alone for ungated experts), as transformers' experts compute it."""
    w = experts.gate_up_proj[e] if experts.has_gate else experts.up_proj[e]
    h = x @ w if experts.is_transposed else x @ w.T
    if experts.has_bias:
        h = h + (experts.gate_up_proj_bias[e] if experts.has_gate else experts.up_proj_bias[e])
    return experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)


def write_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file that appears complete or not at all."""
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    os.replace(partial, path)
