"""Watching vLLM's weight loaders write: which parameter regions each checkpoint tensor fills, on meta tensors.

A TorchDispatchMode taints every tensor derived from a checkpoint tensor with its name and records each
write into a model parameter; the written regions, as element runs, show what nothing writes (vLLM would
serve uninitialised memory) and what is written twice, named as experts and merged shards.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakIdKeyDictionary

from qstream.io.safetensors_io import DTYPE_NAMES


@dataclass
class LoadState:
    """Shared by the header reader and the write tracker of one check."""

    tags: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)  # tensor -> checkpoint names
    last: str = "the first tensor"  # the checkpoint tensor vLLM's loader was handed last
    consumed: set[str] = field(default_factory=set)  # checkpoint tensors some loader wrote into a parameter


@dataclass(frozen=True)
class Write:
    offset: int  # storage offset of the written view, in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    sources: frozenset[str]  # checkpoint tensors the written values came from


class WriteTracker(TorchDispatchMode):
    """Taints every tensor derived from a checkpoint tensor with its name, and records each write into a
    model parameter (which region, from which checkpoint tensors). On meta tensors, so nothing is copied."""

    def __init__(self, model: torch.nn.Module, state: LoadState):
        super().__init__()
        self.params = {p.untyped_storage()._cdata: n for n, p in model.named_parameters()}
        self._tags = state.tags
        self.writes: dict[str, list[Write]] = defaultdict(list)
        self.consumed: set[str] = set()
        self.issues: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tags = frozenset().union(*(self._tags.get(a, ()) for a in _tensors(args, kwargs.values())))
        written = _mutated(func, args, kwargs)
        out = _run_on_meta(func, args, kwargs, written)
        for dst in written:
            self._record(func, dst, args, tags)
        if tags:
            for o in _tensors((out,)):
                self._tags[o] = self._tags.get(o, frozenset()) | tags
        return out

    def _record(self, func, dst: torch.Tensor, args, tags: frozenset[str]) -> None:
        name = self.params.get(dst.untyped_storage()._cdata)
        if name is None or dst.numel() == 0:
            return
        self.writes[name].append(Write(int(dst.storage_offset()), tuple(dst.shape), tuple(dst.stride()), tags))
        self.consumed |= tags
        src = args[1] if func.__name__.startswith("copy_") and len(args) > 1 else None
        if not isinstance(src, torch.Tensor) or not tags:
            return
        what = ", ".join(sorted(tags))
        if src.dtype != dst.dtype and not (src.is_floating_point() and dst.is_floating_point()):
            self.issues.append(f"{name}: a {DTYPE_NAMES.get(dst.dtype, dst.dtype)} parameter written from {what} "
                               f"of dtype {DTYPE_NAMES.get(src.dtype, src.dtype)} (vLLM casts it silently)")
        if tuple(src.shape) != tuple(dst.shape):
            self.issues.append(f"{name}: a region of shape {list(dst.shape)} written from {what} of shape "
                               f"{list(src.shape)} (vLLM broadcasts it silently)")


def _tensors(*groups) -> list[torch.Tensor]:
    """The tensors among op arguments (nested in lists and tuples); torch's tree_flatten costs 10x more."""
    out, stack = [], [a for g in groups for a in g]
    while stack:
        a = stack.pop()
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            stack.extend(a)
    return out


def _mutated(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes into, by its schema (copy_'s self, index_put_'s self, out= arguments...)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            t = args[i] if i < len(args) else kwargs.get(arg.name)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def _run_on_meta(func, args, kwargs, written: list[torch.Tensor]):
    """Run an op; a few parameters are real (vLLM gives them an explicit device): a meta value written into
    one is recorded but not executed, and other ops mixing devices run on meta copies."""
    tensors = _tensors(args, kwargs.values())
    if all(t.is_meta for t in tensors) or not any(t.is_meta for t in tensors):
        return func(*args, **kwargs)
    if written and not written[0].is_meta:
        return written[0] if len(written) == 1 else tuple(written)
    to_meta = tree_map(lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a, (args, kwargs))
    return func(*to_meta[0], **to_meta[1])


def runs(w: Write) -> tuple[np.ndarray, int]:
    """The written view as contiguous element runs: (start of each run, run length)."""
    dims = [(n, s) for n, s in zip(w.shape, w.stride) if n != 1]
    length = 1
    while dims and dims[-1][1] == length:
        length *= dims.pop()[0]
    starts = np.array([w.offset], dtype=np.int64)
    for n, s in dims:
        starts = (starts[:, None] + np.arange(n, dtype=np.int64) * s).ravel()
    return starts, length


def coverage(param: torch.Tensor, writes: list[Write]) -> tuple[list[tuple[int, int]], list[str]]:
    """Element ranges of the parameter nothing writes, and descriptions of regions written twice."""
    numel = param.numel()
    if not writes:
        return [(0, numel)], []
    spans = [runs(w) for w in writes]
    starts = np.concatenate([s for s, _ in spans])
    ends = np.concatenate([s + n for s, n in spans])
    owner = np.concatenate([np.full(len(s), i) for i, (s, _) in enumerate(spans)])
    order = np.argsort(starts, kind="stable")
    starts, ends, owner = starts[order], ends[order], owner[order]
    reach = np.maximum.accumulate(ends)
    gaps = [(0, int(starts[0]))] if starts[0] > 0 else []
    gap_at = np.nonzero(starts[1:] > reach[:-1])[0]
    gaps += [(int(reach[i]), int(starts[i + 1])) for i in gap_at]
    if reach[-1] < numel:
        gaps.append((int(reach[-1]), numel))
    twice = []
    overlap_at = np.nonzero(starts[1:] < reach[:-1])[0]
    if len(overlap_at):
        later = writes[owner[overlap_at[0] + 1]]
        twice.append(f"parameter region written more than once ({len(overlap_at)} overlapping writes), "
                     f"e.g. again from {', '.join(sorted(later.sources)) or 'vLLM itself'}")
    return [g for g in gaps if g[1] > g[0]], twice


def describe(name: str, param: torch.Tensor, module, model, gaps: list[tuple[int, int]]) -> list[str]:
    """Unwritten element ranges as experts and merged shards a person can find in the checkpoint."""
    if not gaps:
        return []
    shape = tuple(param.shape)
    per_expert = math.prod(shape[1:]) if _is_experts(module) and len(shape) == 3 else param.numel()
    per_row = math.prod(shape[-1:]) if len(shape) >= 2 else 1
    rows = per_expert // per_row
    shard_names, shard_sizes = _shards(name, module, model, rows)
    units: dict[str, set[int]] = defaultdict(set)
    for a, b in gaps:
        for e in range(a // per_expert, (b - 1) // per_expert + 1):
            lo, hi = max(a, e * per_expert) - e * per_expert, min(b, (e + 1) * per_expert) - e * per_expert
            r0, r1 = lo // per_row, (hi - 1) // per_row
            bounds = np.cumsum([0, *shard_sizes])
            for s, shard in enumerate(shard_names):
                if r0 < bounds[s + 1] and r1 >= bounds[s]:
                    units[shard].add(e)
    experts_param = per_expert != param.numel()
    return [
        f"{name}{f' {shard}' if shard else ''}{f' of experts {_ranges(sorted(es))}' if experts_param else ''}"
        for shard, es in units.items()
    ]


def _is_experts(module) -> bool:
    return module is not None and hasattr(module, "ckpt_gate_proj_name")


def _shards(name: str, module, model, rows: int) -> tuple[list[str], list[int]]:
    """The checkpoint projections a parameter's rows come from, by vLLM's own tables."""
    if _is_experts(module) and name.rpartition(".")[2].startswith("w13_"):
        half = rows // 2
        return [module.ckpt_gate_proj_name, module.ckpt_up_proj_name], [half, rows - half]
    if _is_experts(module):
        return [module.ckpt_down_proj_name], [rows]
    leaf = name.rpartition(".")[0].rpartition(".")[2]
    parts = getattr(model, "packed_modules_mapping", {}).get(leaf)
    sizes = getattr(module, "output_sizes", None)
    if parts and sizes and len(parts) == len(sizes) and sum(sizes) == rows:
        return list(parts), list(sizes)
    return [""], [rows]


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)
