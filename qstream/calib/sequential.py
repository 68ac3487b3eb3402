"""`quantize --method gptq`: sequential GPTQ through the layer-streaming engine, solved layer by layer into
results the conversion then writes.

For each decoder layer in order, the calibration tokens' hidden states, as the already quantized layers before
it computed them, run through the layer with its source weights while hooks gather the Hessians of its planned
weights (qstream.calib.hessians). Each planned weight is then solved by GPTQ (qstream.calib.gptq) under block
exponents chosen as imatrix chooses them (qstream.calib.imatrix, channel weights = the Hessian's diagonal per
token), the layer is reloaded with its quantized weights and run again, so that the next layer calibrates on
what the quantized model computes. With `asymmetric` (experimental, off by default: it measured worse) the
source model's hidden states of the same tokens run beside them (a second store, advanced through each layer's
source weights), and the weights that read a layer's input are solved against the source's outputs on the
source's inputs rather than their own outputs on the quantized inputs (`qstream.calib.gptq.asymmetric_target`).
Down projections (`fit_down`, the default): once a layer's gate/up are solved, the layer is loaded with them
quantized and run again, and each down projection (a dense gated MLP's, each routed expert's) is solved on what it
now receives against what its source MLP would output on the same tokens (qstream.calib.hessians): the
down projection makes up for its gate/up's rounding. Measured on SmolLM2 (bench/NOTES.md): KL -12% on validation.
Routed experts: each expert's gate/up projection is solved with the Hessian of the tokens routed to it and
its down projection with that of its own intermediate activations. An expert the router sent fewer tokens
than its input width (its Hessian would be singular: GPTQ would fit those few tokens) uses the all-experts
statistics instead: the Hessian of every token for gate/up, and its down
projection's activations on every token. Experts are gathered and solved in groups within `hessian_budget`.

How each module was solved (its case): GPTQ on its own tokens, GPTQ on all tokens (a starved expert), the
imatrix choice (a Hessian that is not positive definite even dampened), mse3 (no tokens at all, or a layout
the Hessian does not fit). The summary counts them per layer.

RESULTS is a directory: per finished decoder layer `layer-NNNNN.safetensors` holding, for each planned source
tensor N (seen as [-1, in]), `N:packed` uint8 [rows, in/2], `N:scales` uint8 [rows, in/32] and `N:case` int8
per module ([] or [E]); and `gptq.json`. A killed run resumes at the first unfinished layer (the finished
ones are run again with their stored results, for their outputs). The same inputs give the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from qstream.calib.calibrate import calibration_ids, coverage_of, dtype_of
from qstream.calib.gptq import (
    stored,
)
from qstream.calib.hessians import DOWN, UP, Hessians, Target
from qstream.calib.solve import (
    CASE,
    CASES,
    MSE3,
    PACKED,
    ROUTED,
    SCALES,
    GptqSettings,
    Solved,
    dequantized,
    expert_groups,
    read_float,
    solve_group,
    solve_modules,
)
from qstream.calib.stats import experts_module, layer_file, write_atomic
from qstream.common import REPORT_NAME, peak_rss_bytes, resolve_device
from qstream.convert.dequantize import is_mxfp4_checkpoint
from qstream.engine.hidden import HiddenStore
from qstream.engine.model import StreamedModel
from qstream.engine.run import Forward, Job, run
from qstream.errors import QstreamError
from qstream.format.mxfp4 import Quantized, quantize
from qstream.format.rules import BLOCK, Method, Rule
from qstream.io.checkpoint import CheckpointTensor
from qstream.io.safetensors_io import TensorInfo, read_header, read_rows
from qstream.io.staging import staging, write_json
from qstream.io.text_sources import Text
from qstream.planning.plan import Plan, QuantJob

SUMMARY_NAME = "gptq.json"
SCHEMA = "qstream-gptq/1"
HESSIAN_BUDGET = 2 << 30  # bytes of expert Hessians gathered at once on the CPU (a group of experts)
GPU_SHARE = 4  # on CUDA: a 1/GPU_SHARE of the free device memory (all 256 experts of a 35B layer in one group)


class RemoteGroups(Protocol):
    """Gathers and solves a layer's expert groups elsewhere (`--ray`: qstream.calib.group_tasks.RayGroups)."""

    def __call__(self, model: StreamedModel, index: int, groups: list[list[int]], starved: frozenset[int],
                 experts: list[Target], kinds: frozenset[str], fitted: dict[str, torch.Tensor] | None = None
                 ) -> Iterable[dict[str, Solved]]:
        """Each group's results by source name, in the order of `groups` (`experts`: after the first pass), for the
        targets of `kinds`; `fitted`: a fit pass, the layer loaded with these quantized gate/up results (a layer
        file's PACKED and SCALES entries)."""

    def describe(self) -> dict:
        """Where the groups went, for the report."""


# Makes one for a run: (plan, settings, hidden store, reference store or None, job, staging directory) -> it
GroupsElsewhere = Callable[[Plan, GptqSettings, HiddenStore, HiddenStore | None, Job, Path], RemoteGroups]


# ---- the engine's editor ----------------------------------------------------------------------------------


class SequentialGptq:
    """An engine Editor: per decoder layer, Hessians, solve, results file, reload with the quantized weights."""

    def __init__(self, plan: Plan, out_dir: Path, s: GptqSettings, device: torch.device, workers: int,
                 progress: bool = False, remote: RemoteGroups | None = None) -> None:
        self.plan, self.out_dir, self.s, self.workers, self.progress = plan, Path(out_dir), s, workers, progress
        self.remote = remote
        self.hessians = Hessians(set(plan.quantized_sources), device, cross=s.asymmetric)
        self.budget = s.hessian_budget or (torch.cuda.mem_get_info(device)[0] // GPU_SHARE if device.type == "cuda"
                                           else HESSIAN_BUDGET)
        self.seconds: dict[int, float] = {}

    def layer_begin(self, model: StreamedModel, index: int) -> None:
        pass

    def layer_end(self, model: StreamedModel, index: int) -> None:
        pass

    def batch_begin(self, batch: int) -> None:
        self.hessians.batch_begin(batch)

    def batch_end(self, batch: int) -> None:
        self.hessians.batch_end(batch)

    def reference(self, on: bool) -> None:
        self.hessians.reference(on)

    def edit(self, model: StreamedModel, index: int, forward: Forward) -> None:
        path = self.out_dir / layer_file(index)
        if not path.exists():
            t0 = time.perf_counter()
            write_atomic(path, self._solve_layer(model, index, forward))
            self.seconds[index] = time.perf_counter() - t0
        elif self.s.asymmetric:  # solved before a resume: the source's stream still goes through this layer
            forward(False, reference=True, advance=True)
        with safe_open(str(path), "pt") as f:
            replace = dequantized(f.keys(), f.get_tensor, self.plan, model.dtype, model.device)
        model.free(index)
        model.load(index, replace)
        forward(True)

    def _solve_layer(self, model: StreamedModel, index: int, forward: Forward) -> dict[str, torch.Tensor]:
        hs = self.hessians
        out: dict[str, torch.Tensor] = {}
        asym = self.s.asymmetric
        hs.watch(model, index)
        try:
            experts = hs.expert_targets
            groups = expert_groups(experts[0].experts, [t.width for t in experts], self.budget, self.workers,
                                   2 if asym or self.s.fit_down else 1) if experts else []
            gate_up = hs.keep_sources() if self.s.fit_down else []
            later = {id(t) for t in hs.fitted}  # solved after the fit pass: the first pass skips them
            hs.begin_pass()
            forward(False, reference=asym, advance=asym and not groups)  # the source's stream moves on in the last
            hs.end_pass()  # pass of the layer's source weights (after the remote groups, which read its inputs)
            for t in hs.targets:
                if not t.experts and id(t) not in later:
                    out.update(self._solve_linear(t))
            starved: frozenset[int] = frozenset()
            kinds = frozenset((UP,)) if any(t.experts for t in hs.fitted) else frozenset((UP, DOWN))
            if experts:
                n_exp, routed = experts[0].experts, experts[0].routed
                floor = self.s.min_tokens or max(t.width for t in experts)
                starved = frozenset(e for e in range(n_exp) if int(routed[e]) < floor)  # type: ignore[index]
                if self.remote is not None:
                    solved = list(self.remote(model, index, groups, starved, experts, kinds))
                    if asym:
                        forward(False, reference=True, advance=True)
                else:
                    solved = [self._gather_and_solve(group, starved, experts, forward, asym and k == len(groups) - 1,
                                                     kinds) for k, group in enumerate(groups)]
                out.update(self._joined(solved))
                out[experts_module(experts[0].sources[0])[0] + ROUTED] = routed.clone()  # type: ignore[union-attr]
            if later:
                for n in gate_up:  # a layout its Hessians did not fit: plain, and the fit sees that
                    if n + PACKED not in out:
                        out.update(_plain(n, self.plan.source.tensors[n]))
                out.update(self._fit(model, index, {n + k: out[n + k] for n in gate_up for k in (PACKED, SCALES)},
                                     groups, starved, experts, forward))
        finally:
            hs.unwatch()
            for t in hs.targets:
                t.h = t.h_all = t.c = t.c_all = None
        for name in model.part_sources(index):  # planned weights no hook saw: plain mse3
            if name in self.plan.decisions and self.plan.decisions[name].quantize and f"{name}{PACKED}" not in out:
                out.update(_plain(name, self.plan.source.tensors[name]))
        return out

    def _fit(self, model: StreamedModel, index: int, fitted: dict[str, torch.Tensor], groups: list[list[int]],
             starved: frozenset[int], experts: list[Target], forward: Forward) -> dict[str, torch.Tensor]:
        """The fitted down projections (see qstream.calib.hessians), with the layer loaded with its quantized gate/up
        (`fitted`: their layer-file entries): dense MLPs' in one pass, experts' a pass per group."""
        hs = self.hessians
        model.load(index, dequantized(fitted, fitted.__getitem__, self.plan, model.dtype, model.device), only=True)
        out: dict[str, torch.Tensor] = {}
        if any(not t.experts for t in hs.fitted):
            hs.begin_pass(fit=True)
            forward(False)
            hs.end_pass()
            for t in hs.fitted:
                if not t.experts:
                    out.update(self._solve_linear(t))
        if any(t.experts for t in hs.fitted):
            down = frozenset((DOWN,))
            if self.remote is not None:
                solved = list(self.remote(model, index, groups, starved, experts, down, fitted))
            else:
                solved = [self._gather_and_solve(group, starved, experts, forward, False, down, fit=True)
                          for group in groups]
            out.update(self._joined(solved))
        return out

    def _joined(self, solved: list[dict[str, Solved]]) -> dict[str, torch.Tensor]:
        """Experts' results, solved group by group, as a layer file holds them."""
        parts: dict[str, list[Solved]] = {}
        for result in solved:
            for name, r in result.items():
                parts.setdefault(name, []).append(r)
        out = {}
        for name, rs in parts.items():
            shape = self.plan.source.tensors[name].info.shape
            out[name + PACKED] = _joined_rows([r[0] for r in rs]).reshape(-1, shape[-1] // 2)
            out[name + SCALES] = _joined_rows([r[1] for r in rs]).reshape(-1, shape[-1] // BLOCK)
            case = _joined_rows([r[2] for r in rs])
            out[name + CASE] = case.reshape(()) if len(shape) == 2 else case
        return out

    def _solve_linear(self, t: Target) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name in t.sources:
            src = self.plan.source.tensors[name]
            if len(src.info.shape) != 2 or src.info.shape[1] != t.width:
                out.update(_plain(name, src))
                continue
            w = read_float(src, 0, src.info.shape[0], t.h.device)  # type: ignore[union-attr]
            c = t.c[None] if t.c is not None and t.cross else None
            packed, scales, case = solve_modules(w[None], t.h[None], t.tokens[None], self.s, c=c)  # type: ignore[index]
            out.update({name + PACKED: packed[0], name + SCALES: scales[0], name + CASE: case[0]})
        return out

    def _gather_and_solve(self, group: list[int], starved: frozenset[int], experts: list[Target],
                          forward: Forward, advance: bool, kinds: frozenset[str], fit: bool = False
                          ) -> dict[str, Solved]:
        """One pass of the live layer gathering `group`'s Hessians of the targets of `kinds` (with the reference
        stream when asymmetric, but for a fit pass; `advance`: the last such pass), then solved (in this process)."""
        self.hessians.begin_pass(group, starved & frozenset(group), kinds, fit)
        forward(False, reference=self.s.asymmetric and not fit, advance=advance)
        self.hessians.end_pass()
        out: dict[str, Solved] = {}
        for t in experts:
            if t.kind in kinds:
                out.update(self._solve_group(t, group, starved))
        return out

    def _solve_group(self, t: Target, group: list[int], starved: frozenset[int]) -> dict[str, Solved]:
        return solve_group(self.plan, self.s, t, group, starved)


def _joined_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Groups' results one after another; a single group's as it is (a copy of all 256 experts' codes is not free)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _plain(name: str, src: CheckpointTensor) -> dict[str, torch.Tensor]:
    """mse3 of a planned weight without usable Hessians (case mse3), as a layer file holds it."""
    shape = src.info.shape
    q = quantize(src.read_rows(0, src.info.row_shape[0]).float(), Rule.MSE3)
    case = torch.full(shape[:1] if len(shape) == 3 else (), MSE3, dtype=torch.int8)
    return {name + PACKED: q.packed, name + SCALES: q.scales, name + CASE: case}


# ---- the run ---------------------------------------------------------------------------------------------


def _fingerprint(plan: Plan, text: dict, s: GptqSettings, device: torch.device) -> dict:
    return {"writer": "qstream quantize --method gptq", "qstream_version": __import__("qstream").__version__,
            "source": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in plan.source.weight_files],
            "planned": hashlib.sha256("\n".join(plan.quantized_sources).encode()).hexdigest(),
            "text_sha256": text["sha256"], "taken": text["taken"], "device": device.type, **s.describe()}


def solve_sequential(plan: Plan, out: Path, text: Text, s: GptqSettings | None = None, overwrite: bool = False,
                     resume: bool = False, progress: bool = True, elsewhere: GroupsElsewhere | None = None) -> dict:
    """Write RESULTS `out` (see module doc) for the planned weights of plan.source; returns the summary.
    `elsewhere`: each layer's expert groups are gathered and solved by what it makes (`--ray`: Ray tasks,
    qstream.calib.group_tasks.RayGroups); the same bytes."""
    s = s or GptqSettings()
    t0 = time.perf_counter()
    device, dtype = resolve_device(s.device), dtype_of(s.dtype)
    ckpt = plan.source
    if is_mxfp4_checkpoint(ckpt):
        raise QstreamError(f"{ckpt.root}: already MXFP4; run GPTQ on the checkpoint it was quantized from")
    with StreamedModel(ckpt.root, dtype, device) as model:
        ids, text_info = calibration_ids(ckpt.root, text, s.samples, s.seq_len)
        if int(ids.max()) >= model.vocab_size:
            raise QstreamError(f"{ckpt.root}: its tokenizer yields id {int(ids.max())}, beyond the model's "
                               f"{model.vocab_size} embeddings; the tokenizer does not belong to this model")
        job = Job(ids, tuple((k * s.seq_len, (k + 1) * s.seq_len) for k in range(s.samples)))
        workers = 1 if device.type == "cuda" else torch.get_num_threads()
        with staging(ckpt.root, Path(out), overwrite, "qstream gptq", _fingerprint(plan, text_info, s, device),
                     resume, bookkeeping=("qstream-hidden-*",)) as tmp:
            for stale in tmp.glob("qstream-hidden-*"):
                stale.unlink()
            first = next((i for i in range(model.n_layers) if not (tmp / layer_file(i)).exists()), model.n_layers)
            with HiddenStore(job.tokens, model.hidden_size, dtype, s.hidden_budget, tmp, device) as store, \
                    contextlib.ExitStack() as more:
                ref = (more.enter_context(HiddenStore(job.tokens, model.hidden_size, dtype, s.hidden_budget, tmp,
                                                      device)) if s.asymmetric else None)
                remote = None if elsewhere is None else elsewhere(plan, s, store, ref, job, tmp)
                editor = SequentialGptq(plan, tmp, s, device, workers, remote=remote)
                stats = run(model, job, store, editor, 0, s.batch_tokens, progress, ahead=False, workers=workers,
                            reference=ref)
            summary = _summary(plan, tmp, model.n_layers, text_info, s, device, dtype)
            write_json(tmp / SUMMARY_NAME, summary)
            write_json(tmp / REPORT_NAME, {
                "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes(), "tokens": job.tokens,
                "resumed_from_layer": first if resume else None,
                "solve_seconds": {str(k): v for k, v in sorted(editor.seconds.items())},
                "parts": [asdict(p) for p in stats.parts], **({"scale_out": remote.describe()} if remote else {})})
    return summary


def _summary(plan: Plan, tmp: Path, n_layers: int, text: dict, s: GptqSettings, device: torch.device,
             dtype: torch.dtype) -> dict:
    """What was solved how, per layer, and the routed tokens each experts module saw."""
    layers: list[dict] = []
    routed: dict[str, dict[int, int]] = {}
    for i in range(n_layers):
        with safe_open(str(tmp / layer_file(i)), "pt") as f:
            counts = [0] * len(CASES)
            for key in sorted(f.keys()):
                if key.endswith(CASE):
                    for c in f.get_tensor(key).reshape(-1).tolist():
                        counts[c] += 1
                elif key.endswith(ROUTED):
                    routed[key.removesuffix(ROUTED)] = dict(enumerate(f.get_tensor(key).tolist()))
        layers.append(dict(zip(CASES, counts)))
    return {"schema": SCHEMA, "qstream_version": __import__("qstream").__version__,
            "source": str(plan.source.root.resolve()), "text": text, "samples": s.samples, "seq_len": s.seq_len,
            "tokens": s.samples * s.seq_len, "settings": s.describe(), "dtype": str(dtype).removeprefix("torch."),
            "device": device.type, "cases": {c: sum(layer[c] for layer in layers) for c in CASES},
            "cases_counted": "per planned source tensor, per expert of a fused experts tensor",
            "case_meaning": {"gptq": "GPTQ with the module's own tokens",
                             "gptq-all-tokens": "GPTQ with every token's statistics (a routed expert the router "
                                                "sent fewer tokens than its input width)",
                             "imatrix": "the imatrix choice alone (its Hessian could not be factored)",
                             "mse3": "mse3 (no tokens, or a layout its Hessian does not fit)"},
            "layers": layers, "expert_coverage": coverage_of(routed, per_expert=True)}


class GptqModules:
    """RESULTS checked against a plan, as the conversion's calibrated method (convert.pipeline.Calibrated):
    every planned module's codes and scales, read as its rows are written."""

    method = Method.GPTQ.value

    def __init__(self, results: Path, plan: Plan) -> None:
        self.results = Path(results)
        summary = self.results / SUMMARY_NAME
        if not summary.is_file():
            raise QstreamError(f"{self.results}: no {SUMMARY_NAME}; GPTQ results are incomplete: run again")
        self.summary = json.loads(summary.read_text())
        self.solve_report = json.loads((self.results / REPORT_NAME).read_text())  # times: the report's, not the card's
        self.where: dict[str, tuple[Path, TensorInfo, TensorInfo]] = {}
        for path in sorted(self.results.glob("layer-*.safetensors")):
            tensors = read_header(path).tensors
            for key, info in tensors.items():
                if key.endswith(PACKED):
                    name = key.removesuffix(PACKED)
                    self.where[name] = (path, info, tensors[name + SCALES])
        for name in plan.quantized_sources:
            shape = plan.source.tensors[name].info.shape
            rows = plan.source.tensors[name].info.row_shape[0]
            got = self.where.get(name)
            if got is None or got[1].shape != (rows, shape[-1] // 2) or got[2].shape != (rows, shape[-1] // BLOCK):
                raise QstreamError(f"{self.results}: no GPTQ result of the right shape for {name}; the results are "
                                   "for another model or plan: remove them and run again")

    def for_job(self, job: QuantJob) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's packed codes and scales, rows as the job takes them from its source."""
        path, packed, scales = self.where[job.source.name]
        r1 = job.row_start + (job.rows - 1) * job.row_step + 1
        return tuple(read_rows(path, info, job.row_start, r1)[::job.row_step]  # type: ignore[return-value]
                     for info in (packed, scales))

    def quantize(self, w: torch.Tensor, data: Any, row: int) -> Quantized:
        packed, scales = data
        return stored(w, packed[row:row + w.shape[0]].to(w.device), scales[row:row + w.shape[0]].to(w.device))

    def fingerprint(self) -> dict:
        st = (self.results / SUMMARY_NAME).stat()
        return {"results": [str(self.results), st.st_size, st.st_mtime_ns]}

    def describe(self) -> dict:
        s = self.summary
        return {"results": str(self.results), **s["settings"], "tokens": s["tokens"], "cases": s["cases"],
                "case_meaning": s["case_meaning"], "text": s["text"], "expert_coverage": s["expert_coverage"],
                "solve_report": self.solve_report}
