"""Hessians H = sum over tokens of x x^T of a live layer's quantizable weights, gathered while the engine runs it:
what sequential GPTQ (qstream.calib.sequential) solves with.

A Linear's input is caught by a forward pre-hook. A fused experts module (transformers' experts interface,
see qstream.calib.stats) is caught with its routing: each routed expert's gate/up projection gets the Hessian
of the tokens routed to it and its down projection that of its own intermediate activations on them. Every
experts module also keeps the Hessian of all its input tokens (shared by every expert's gate/up), and on
request the down-projection Hessian of chosen experts over all tokens: the all-experts statistics a starved
expert falls back to. Experts are gathered in groups (one pass of the layer each), so that a layer of 256
experts with 2048 inputs never holds more Hessians than its memory budget.

With a reference stream (the source model's hidden states of the same tokens, run through the same layer just
before each batch's own rows; see `reference`), the weights that read the layer's first input (q/k/v, gate/up,
experts' gate/up: the first input a watched weight sees in a batch) also get their cross term C = sum x_ref x^T,
token for token (an expert's tokens are those routed to it in the batch's own rows): what GPTQ against the
source's outputs needs (`qstream.calib.gptq.asymmetric_target`). The later weights (o_proj, down) get none:
their inputs here come from the source weights of the weights before them, which that solve corrects towards
the source, so correcting them too would count the drift twice (measured on SmolLM2: the error then grows layer
by layer until the model is lost). A down projection's own cross term comes from a fit pass instead, within its
MLP: the source gate/up's activations against the quantized gate/up's on the same tokens (see `Hessians`).

Each batch's products are formed in float32 and summed into float64 totals in batch order, whichever thread
ran the batch: the same Hessians run to run and across thread counts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qstream.calib.stats import _is_experts, down_input, experts_dims, experts_inputs, up_params
from qstream.engine.model import StreamedModel

LINEAR, UP, DOWN = "linear", "up", "down"  # what a target's input is: a Linear's, experts' gate/up, experts' down


@dataclass
class Target:
    """A model parameter whose input is watched, the planned source tensors it was loaded from, and its sums.

    A Linear: `h` [in, in] over every token, `tokens`. Experts: `routed` [E] tokens the router sent to each;
    `h` [G, in, in] and `tokens` [G] for the current group's experts (routed tokens, or every token for a
    starved expert's down projection); gate/up also keep `h_all` [in, in] over every token, `tokens_all`.
    `c`, `c_all`: the cross terms of `h` and `h_all` with the reference stream (None without one); `cross`: they
    were gathered (the weight reads the layer's first input, or a down projection was fitted: see `Hessians`).
    `mlp`: for a Linear down projection, the gated MLP it ends (gate_proj, up_proj, act_fn) when its output can be
    recomputed from the MLP's input (`Hessians.keep_sources`); `source`: the gate/up weights kept for the fit."""

    param: str
    sources: list[str]
    kind: str
    width: int
    experts: int = 0
    module: Any = None
    h: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    routed: torch.Tensor | None = None
    h_all: torch.Tensor | None = None
    tokens_all: int = 0
    c: torch.Tensor | None = None
    c_all: torch.Tensor | None = None
    cross: bool = False
    mlp: Any = None
    source: tuple[Any, ...] = ()  # weights (and biases or None)
    whole: bool = True  # every source tensor of the parameter is planned (it can be loaded quantized alone)


@dataclass
class _Pass:
    """One pass over the batches. The first gathers every Linear's Hessian, the experts' shared all-token
    Hessian and their routed counts; each later one a group of experts' Hessians (`starved`: those whose
    down projection is measured on every token; `kinds`: of which targets, UP and/or DOWN). `fit`: a pass after
    gate/up were quantized (see `Hessians`): the fitted down projections' Hessians and cross terms, the
    dense MLPs' (no group) or a group of experts'."""

    group: Sequence[int] = ()
    starved: frozenset[int] = frozenset()
    kinds: frozenset[str] = frozenset((UP, DOWN))
    fit: bool = False
    partials: dict[int, dict[tuple[int, str], list]] = field(default_factory=dict)
    next: int = 0

    @property
    def first(self) -> bool:
        return not self.group and not self.fit


class Hessians:
    """Hooks on the live layer's planned weights and their sums, in batch order (a half of an engine Observer).

    `wanted`: the planned source tensor names; `device`: where the sums live; `cross`: also gather the cross
    terms with a reference stream (every batch then runs its reference rows first).

    Fitting a down projection to its source MLP's output (`GptqSettings.fit_down`): once the layer's gate/up are
    solved, `keep_sources` keeps their source weights, the layer is loaded with the quantized gate/up, and fit passes
    gather each down projection's Hessian of what it now receives, H = sum a_q a_q^T, with the cross term
    C = sum a_src a_q^T, a_src its input under the source gate/up on the same tokens (computed in the hook from the
    kept weights): GPTQ then rounds down towards the source MLP's output (`qstream.calib.gptq.asymmetric_target`)."""

    def __init__(self, wanted: set[str], device: torch.device, cross: bool = False) -> None:
        self.wanted, self.device, self.cross = wanted, device, cross
        self.targets: list[Target] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pass: _Pass | None = None

    # ---- hooks --------------------------------------------------------------------------------------

    def watch(self, model: StreamedModel, index: int) -> None:
        """Find the planned weights of decoder layer `index` (loaded) and hook their inputs."""
        self.targets = []
        for name, module in model.layers[index].named_modules(prefix=model.layer_path(index)):
            if isinstance(module, nn.Linear):
                t = self._target(model, f"{name}.weight", LINEAR, module.in_features)
                if t is not None:
                    self._handles.append(module.register_forward_pre_hook(self._linear_hook(t)))
            elif _is_experts(module):
                self._watch_experts(model, name, module)
        by_param = {t.param: t for t in self.targets}
        for name, module in model.layers[index].named_modules(prefix=model.layer_path(index)):
            t = by_param.get(f"{name}.down_proj.weight")
            gated = all(isinstance(getattr(module, p, None), nn.Linear) for p in ("gate_proj", "up_proj"))
            if t is not None and gated and callable(getattr(module, "act_fn", None)):
                t.mlp = module
                self._handles.append(module.register_forward_pre_hook(self._mlp_hook(module)))

    def unwatch(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for t in self.targets:
            t.source = ()  # the kept source weights go with the layer

    @property
    def expert_targets(self) -> list[Target]:
        return [t for t in self.targets if t.experts]

    @property
    def fitted(self) -> list[Target]:
        """The down projections a fit pass gathers for (after `keep_sources`): dense MLPs' and experts'."""
        return [t for t in self.targets if t.source and (t.kind == DOWN or t.mlp is not None)]

    def keep_sources(self) -> list[str]:
        """Keep the live layer's gate/up weights (still the source's) for the fit passes, and return the planned
        gate/up source tensors whose quantized values the layer must be loaded with for them. A dense MLP whose
        output is not down(act(gate x) * up x) on a probe input is not fitted (its down keeps plain GPTQ), nor is a
        down projection whose gate/up parameter is only partly planned."""
        gate_up = []
        by_param = {t.param: t for t in self.targets}
        for t in self.targets:
            if t.kind == DOWN:
                up = by_param.get(t.param.rpartition(".")[0] + "." + experts_dims(t.module)[0])
                if up is not None and up.whole:
                    t.source = up_params(t.module)
                    gate_up += up.sources
            elif t.mlp is not None:
                gate, upl = (by_param.get(f"{t.param.rsplit('.', 2)[0]}.{p}.weight") for p in ("gate_proj", "up_proj"))
                m = t.mlp
                if gate and upl and gate.whole and upl.whole and _gated(m, m.gate_proj, m.up_proj):
                    t.source = (m.gate_proj.weight, m.gate_proj.bias, m.up_proj.weight, m.up_proj.bias)
                    gate_up += gate.sources + upl.sources
        return gate_up

    def _target(self, model: StreamedModel, param: str, kind: str, width: int, experts: int = 0,
                module: Any = None) -> Target | None:
        sources = [s for s in model.sources_of(param) if s in self.wanted]
        if not sources:
            return None
        t = Target(param, sources, kind, width, experts, module, whole=len(sources) == len(model.sources_of(param)))
        self.targets.append(t)
        return t

    def reference(self, on: bool) -> None:
        """The layer calls that follow in this thread see reference rows (on): their inputs are kept for the cross
        terms of the batch's own rows that come next."""
        self._local.reference = on

    def _in_reference(self, key: int, x: torch.Tensor) -> bool:
        """In a reference call: keep x under `key` for the batch's own rows that come next, and say so."""
        if getattr(self._local, "reference", False):
            self._local.kept[key] = x
            return True
        return False

    def _kept(self, key: int, where: str, x: torch.Tensor) -> torch.Tensor | None:
        """The reference input kept for this call with input x: None when not gathering cross terms, or when x is
        not the first input a watched weight saw in this batch (a later stage's: see the module doc)."""
        if not self.cross:
            return None
        first = self._local.first = self._local.first or x.data_ptr()
        x_ref = self._local.kept.pop(key, None)
        if x.data_ptr() != first:
            return None
        if x_ref is None:
            raise RuntimeError(f"{where}: no reference input before the batch's own rows (run the reference stream)")
        return x_ref

    def _mlp_hook(self, mlp: nn.Module) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if self._pass is not None and self._pass.fit and not self._pass.group:
                self._local.mlp_in[id(mlp)] = args[0]
        return hook

    def _linear_hook(self, t: Target) -> Callable:
        def hook(module: nn.Linear, args: tuple) -> None:
            p = self._pass
            if p is not None and p.fit and not p.group and t.source:  # a dense down projection's fit pass
                a_q = args[0].reshape(-1, module.in_features)
                g, gb, u, ub = t.source
                x = self._local.mlp_in.pop(id(t.mlp))
                a_src = t.mlp.act_fn(F.linear(x, g, gb)) * F.linear(x, u, ub)
                self._add((id(t), "h"), a_q)
                self._add((id(t), "c"), a_q, a_src.reshape(a_q.shape))
                t.cross = True
            elif p is not None and p.first and not t.source:  # a fitted down's Hessian comes from its fit pass
                x = args[0].reshape(-1, module.in_features)
                if self._in_reference(id(t), x):
                    return
                self._add((id(t), "h"), x)
                x_ref = self._kept(id(t), t.param, x)
                if x_ref is not None:
                    self._add((id(t), "c"), x, x_ref)
                    t.cross = True
        return hook

    def _watch_experts(self, model: StreamedModel, name: str, experts: Any) -> None:
        up_name, n_exp, hidden, inner = experts_dims(experts)
        t_up = self._target(model, f"{name}.{up_name}", UP, hidden, n_exp, experts)
        t_down = self._target(model, f"{name}.down_proj", DOWN, inner, n_exp, experts)
        if t_up is None and t_down is None:
            return
        targets = [t for t in (t_up, t_down) if t is not None]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._pass is None:
                return
            x, index = experts_inputs(module, args, kwargs)
            if self._pass.fit:
                self._fit_sums(module, x, index, targets)
                return
            if self._in_reference(id(module), x):
                return
            self._expert_sums(module, x, index, targets, self._kept(id(module), name, x))

        self._handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))

    def _expert_sums(self, experts: Any, x: torch.Tensor, index: torch.Tensor, targets: list[Target],
                     x_ref: torch.Tensor | None) -> None:
        p = self._pass
        if p is None:
            return
        if p.first:
            counts = torch.bincount(index.reshape(-1).cpu(), minlength=targets[0].experts)[:targets[0].experts]
            for t in targets:
                self._add((id(t), "routed"), counts)
                if t.kind == UP:
                    self._add((id(t), "all"), x)
                    if x_ref is not None:
                        self._add((id(t), "c_all"), x, x_ref)
                        t.cross = True
            return
        for slot, e in enumerate(p.group):
            rows = slice(None) if e in p.starved else (index == e).any(-1)
            xe = x[rows]
            for t in targets:
                if t.kind not in p.kinds or t.kind == UP and e in p.starved:
                    continue  # a starved expert's gate/up uses the shared all-token Hessian
                xt = xe if t.kind == UP else down_input(experts, e, xe)
                self._add((id(t), f"e{slot}"), xt)
                if x_ref is not None and t.kind == UP:  # down reads gate/up's output: a later stage
                    self._add((id(t), f"c{slot}"), xt, x_ref[rows])

    def _fit_sums(self, experts: Any, x: torch.Tensor, index: torch.Tensor, targets: list[Target]) -> None:
        """A fit pass over a group of experts: each down projection's input under the live (quantized) gate/up and
        under the kept source ones, on the expert's tokens (every token for a starved expert)."""
        p = self._pass
        for t in targets:
            if t.kind != DOWN or not t.source or p is None:
                continue
            for slot, e in enumerate(p.group):
                xe = x[slice(None) if e in p.starved else (index == e).any(-1)]
                a_q = down_input(experts, e, xe)
                self._add((id(t), f"e{slot}"), a_q)
                self._add((id(t), f"c{slot}"), a_q, down_input(experts, e, xe, t.source))
                t.cross = True

    def _add(self, key: tuple[int, str], x: torch.Tensor, x_ref: torch.Tensor | None = None) -> None:
        """This batch's x^T x (float32; x_ref^T x for a cross term) and token count under `key` (routed counts:
        added as they are)."""
        partial = self._local.partial
        if key[1] == "routed":
            value, n = x, 0
        else:
            xf = x.float()
            value, n = (xf if x_ref is None else x_ref.float()).T @ xf, x.shape[0]
        if key in partial:
            partial[key][0] += value
            partial[key][1] += n
        else:
            partial[key] = [value, n]

    # ---- passes -------------------------------------------------------------------------------------

    def begin_pass(self, group: Sequence[int] = (), starved: frozenset[int] = frozenset(),
                   kinds: frozenset[str] = frozenset((UP, DOWN)), fit: bool = False) -> None:
        """The next pass over the batches gathers the first pass's sums (no group), a group's, or a fit pass's
        (see _Pass)."""
        self._pass = _Pass(group, starved, kinds, fit)
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=self.device)

        fitted = {id(t) for t in self.fitted}
        for t in self.targets:
            if fit:
                if id(t) in fitted and bool(t.experts) == bool(group):
                    t.h = t.c = None
                    n = (len(group),) if group else ()
                    t.h, t.c = zeros(*n, t.width, t.width), zeros(*n, t.width, t.width)
                    t.tokens = torch.zeros(n, dtype=torch.int64)
            elif not t.experts:
                if group or t.source:
                    continue
                t.h, t.tokens = zeros(t.width, t.width), torch.zeros((), dtype=torch.int64)
                t.c = zeros(t.width, t.width) if self.cross else None
            elif not group:
                t.routed = torch.zeros(t.experts, dtype=torch.int64)
                if t.kind == UP:
                    t.h_all, t.tokens_all = zeros(t.width, t.width), 0
                    t.c_all = zeros(t.width, t.width) if self.cross else None
            elif t.kind in kinds:
                t.h = t.c = None  # the previous group's go before this one's are made
                t.h = zeros(len(group), t.width, t.width)
                t.c = zeros(len(group), t.width, t.width) if self.cross and t.kind == UP else None  # down: none
                t.tokens = torch.zeros(len(group), dtype=torch.int64)

    def end_pass(self) -> None:
        p = self._pass
        self._pass = None
        if p is not None and p.partials:
            raise RuntimeError(f"batches {sorted(p.partials)} finished after a missing one")

    def batch_begin(self, batch: int) -> None:
        self._local.partial, self._local.kept, self._local.reference, self._local.first = {}, {}, False, 0
        self._local.mlp_in = {}

    def batch_end(self, batch: int) -> None:
        """Keep this batch's sums; add every finished batch in order, so the totals never depend on timing.
        The thread lets go of the batch's partials and kept inputs here: held until its next batch, they would
        outlive the pass (a group's float32 partials, 151 MB on the SmolLM2 MoE)."""
        p, partial = self._pass, self._local.partial
        self._local.partial, self._local.kept, self._local.mlp_in = {}, {}, {}
        if p is None:
            return
        with self._lock:
            p.partials[batch] = partial
            by_id = {id(t): t for t in self.targets}
            while p.next in p.partials:
                for (tid, what), (value, n) in p.partials.pop(p.next).items():
                    _merge(by_id[tid], what, value, n)
                p.next += 1


def _merge(t: Target, what: str, value: torch.Tensor, n: int) -> None:
    if what == "h":
        t.h += value  # type: ignore[operator]
        t.tokens += n  # type: ignore[operator, assignment]
    elif what == "c":
        t.c += value  # type: ignore[operator]
    elif what == "routed":
        t.routed += value  # type: ignore[operator]
    elif what == "all":
        t.h_all += value  # type: ignore[operator]
        t.tokens_all += n
    elif what == "c_all":
        t.c_all += value  # type: ignore[operator]
    elif what[0] == "c":
        t.c[int(what[1:])] += value  # type: ignore[index]
    else:
        slot = int(what[1:])
        t.h[slot] += value  # type: ignore[index]
        t.tokens[slot] += n  # type: ignore[index]


def _gated(mlp: nn.Module, gate: nn.Linear, up: nn.Linear) -> bool:
    """Whether mlp(x) is down(act_fn(gate x) * up x) on a probe input (what a dense fit recomputes)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, gate.in_features, generator=g).to(gate.weight.device, gate.weight.dtype)
    with torch.no_grad():
        want = mlp(x)
        got = mlp.get_submodule("down_proj")(mlp.act_fn(gate(x)) * up(x))  # type: ignore[operator]
    return bool(torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-6))
