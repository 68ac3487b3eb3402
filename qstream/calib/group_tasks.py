"""A layer's expert groups as Ray tasks (`qstream quantize --method gptq --ray`): each task gathers one group's
Hessians and solves the group, where the cluster has room; the driver stays sequential over the layers.

The driver (calib.sequential) runs each layer's first pass itself (the Linears' Hessians, the routed counts, the
all-token Hessian of gate/up), then hands the layer's expert groups out. A task reads the layer's source weights
from the shared source, as a shard task reads its rows, runs the layer over the calibration tokens' hidden
states with hooks on the group's experts (qstream.calib.hessians) and solves the group
(qstream.calib.solve.solve_group); it returns the group's packed codes, scales and cases, and writes nothing,
so a retried task only starts over. With down projections fitted (`GptqSettings.fit_down`) a layer's groups go
out twice: first for gate/up, then, once every group's gate/up is back, for down, each task loading the layer with
the quantized gate/up the driver wrote to the staging directory beside the hidden states.

The layer's input hidden states travel through the staging directory as one safetensors file per layer (written
once by the driver, read one batch at a time by each task), not through Ray's object store: the tasks already
read the source by path from a filesystem every node mounts, the driver streams the file from its hidden store
(which may itself be spilled to disk) without holding it, a task holds one batch of it, and every node
reads the same file rather than keeping its own copy of the object in shared memory. It is removed once the
layer's groups are solved; a resumed run removes a killed run's.

Same bytes as one process: the same groups, batches in the same order and layout, each batch's products in
float32 summed into float64 in batch order, on the same kind of device; on the CPU every op single-threaded, as
the engine runs them whenever it spreads batches over threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from qstream.calib.hessians import UP, Hessians, Target
from qstream.calib.solve import GptqSettings, Solved, dequantized, solve_group
from qstream.calib.stats import write_atomic
from qstream.cluster import Cluster, run_tasks
from qstream.common import CHUNK_ELEMENTS, row_chunks
from qstream.engine.hidden import HiddenStore
from qstream.engine.model import StreamedModel
from qstream.engine.run import Job
from qstream.io.safetensors_io import DTYPE_NAMES, OutEntry, ShardWriter, read_header, read_rows
from qstream.planning.plan import Plan

HIDDEN = "hidden"  # the tensor of a layer's input file: [tokens, hidden size], rows in the store's order
Batch = tuple[int, int, int]  # first row, sequences, their length: one engine batch


def hidden_file(index: int, what: str = "") -> str:
    """A layer's file in the staging directory (under the bookkeeping glob qstream-hidden-*): its input; `what`
    "reference": the source model's hidden states of the same tokens (asymmetric GPTQ), "fitted": its quantized
    gate/up (a fit pass)."""
    return f"qstream-hidden-{index:05d}{'-' + what if what else ''}.safetensors"


_models: dict[tuple[str, torch.dtype, str], StreamedModel] = {}  # this worker process's, built once per run


def _model(root: Path, dtype: torch.dtype, device: str) -> StreamedModel:
    """The source's StreamedModel with its resident part loaded, kept for the worker's later tasks (building it
    costs more than many a group's work)."""
    key = (str(Path(root).resolve()), dtype, device)
    if key not in _models:
        _models.clear()
        _models[key] = StreamedModel(Path(root), dtype, torch.device(device)).__enter__()
    return _models[key]


AllTokens = tuple[torch.Tensor, int, torch.Tensor | None]  # a gate/up target's h_all, tokens_all, c_all


def group_task(plan: Plan, s: GptqSettings, dtype: torch.dtype, device: str, cwd: str, index: int, hidden: Path,
               reference: Path | None, batches: list[Batch], starved: frozenset[int],
               all_tokens: dict[str, AllTokens], kinds: frozenset[str], fitted: Path | None,
               group: list[int]) -> dict[str, Solved]:
    """One Ray task: decoder layer `index` of the source over the hidden states in `hidden` (each batch's rows of
    `reference` first, when asymmetric), batch by batch in order, gathering `group`'s Hessians of the targets of
    `kinds`; then those solved. `all_tokens`: each gate/up target's all-token sums (by model parameter), for its
    starved experts. `fitted`: a fit pass, over the layer loaded with the quantized gate/up in this file (its
    layer-file entries). Relative paths mean what they meant to the driver (`cwd`)."""
    os.chdir(cwd)
    if device == "cpu":
        torch.set_num_threads(1)  # the engine's rounding with its batches spread over threads (see engine.run)
    model = _model(plan.source.root, dtype, device)
    info = read_header(hidden).tensors[HIDDEN]
    hs = Hessians(set(plan.quantized_sources), torch.device(device), cross=reference is not None)

    def rows(path: Path, r0: int, count: int, length: int) -> torch.Tensor:
        return read_rows(path, info, r0, r0 + count * length).view(count, length, -1).to(model.device)

    model.load(index)
    try:
        hs.watch(model, index)
        if fitted is not None:
            hs.keep_sources()
            with safe_open(str(fitted), "pt") as f:
                model.load(index, dequantized(f.keys(), f.get_tensor, plan, model.dtype, model.device), only=True)
        hs.begin_pass(group, starved & frozenset(group), kinds, fit=fitted is not None)
        with model.live(model.layers[index]), torch.inference_mode():
            for k, (r0, count, length) in enumerate(batches):
                hs.batch_begin(k)
                if reference is not None and fitted is None:
                    hs.reference(True)
                    model.layer_pass(rows(reference, r0, count, length))
                    hs.reference(False)
                model.layer_pass(rows(hidden, r0, count, length))
                hs.batch_end(k)
        hs.end_pass()
        out: dict[str, Solved] = {}
        for t in hs.expert_targets:
            if t.kind not in kinds:
                continue
            if t.kind == UP:
                t.h_all, t.tokens_all, t.c_all = all_tokens[t.param]
                t.cross = t.c_all is not None
            out.update(solve_group(plan, s, t, group, starved))
        return out  # on the CPU, as solve_modules returns them
    finally:
        hs.unwatch()
        model.free(index)


class RayGroups:
    """sequential.RemoteGroups on a Ray cluster (`qstream.cluster.connected` must be entered already, `resources`
    what it yielded): a task per expert group, 1 CPU each, or 1 GPU each when the run's device is cuda.
    `functools.partial(RayGroups, cluster, resources)` is what `sequential.solve_sequential` takes as `elsewhere`."""

    def __init__(self, cluster: Cluster, resources: dict, plan: Plan, s: GptqSettings, store: HiddenStore,
                 reference: HiddenStore | None, job: Job, staging: Path) -> None:
        self.cluster, self.resources, self.plan, self.s, self.store = cluster, resources, plan, s, store
        self.reference = reference
        self.staging = staging.resolve()
        self.batches = [(job.offsets[first], count, length) for first, count, length in job.batches(s.batch_tokens)]
        self.tasks = 0

    def __call__(self, model: StreamedModel, index: int, groups: list[list[int]], starved: frozenset[int],
                 experts: list[Target], kinds: frozenset[str], fitted: dict[str, torch.Tensor] | None = None
                 ) -> Iterator[dict[str, Solved]]:
        """Each group's results by source name, in the order of `groups` (tasks finish in any order)."""
        hidden = self.staging / hidden_file(index)
        reference = None if self.reference is None or fitted else self.staging / hidden_file(index, "reference")
        fitted_path = None if fitted is None else self.staging / hidden_file(index, "fitted")
        self._write_inputs(self.store, hidden)
        if reference is not None:
            self._write_inputs(self.reference, reference)  # type: ignore[arg-type]
        if fitted_path is not None:
            write_atomic(fitted_path, fitted)  # type: ignore[arg-type]
        all_tokens = {t.param: (t.h_all.cpu(), t.tokens_all, t.c_all.cpu() if t.cross else None)  # type: ignore[union-attr]
                      for t in experts if t.kind == UP}
        device = model.device.type
        shared = (self.plan, self.s, model.dtype, device, os.getcwd(), index, hidden, reference, self.batches, starved,
                  all_tokens, kinds, fitted_path)
        done: dict[int, dict[str, Solved]] = {}
        try:
            for k, result in run_tasks(group_task, groups, shared, gpus=1 if device == "cuda" else 0,
                                       max_retries=self.cluster.max_retries):
                done[k] = result
                self.tasks += 1
        finally:
            for path in (hidden, reference, fitted_path):
                if path is not None:
                    path.unlink(missing_ok=True)
        return (done[k] for k in range(len(groups)))

    @staticmethod
    def _write_inputs(st: HiddenStore, path: Path) -> None:
        """A store's rows (the live layer's inputs) as one safetensors tensor, streamed in row chunks."""
        with ShardWriter(path, [OutEntry(HIDDEN, DTYPE_NAMES[st.dtype], (st.rows, st.width))]) as w:
            for r0, r1 in row_chunks(st.rows, st.width, CHUNK_ELEMENTS):
                w.write(HIDDEN, st.read(r0, r1), r0 * st.row_bytes)

    def describe(self) -> dict:
        """The cluster and the work it was given, for the report."""
        return {"engine": "ray", **self.resources, "group_tasks": self.tasks, "max_retries": self.cluster.max_retries}
