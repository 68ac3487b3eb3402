"""Carry out a plan: stream tensors from the source shards into new shards, then publish.

Everything is written into a temporary directory beside DST, which is renamed into
place only once every shard, the config, the index and the report are on disk. A
shard is written as `<name>.partial` and renamed when closed, so a killed run can be
resumed shard by shard.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from qstream.common import CHUNK_ELEMENTS, REPORT_NAME, Clock, peak_rss_bytes, resolve_device, row_chunks
from qstream.convert.streams import OrderedWriter, prefetch
from qstream.errors import QstreamError
from qstream.format.kernels import quantize_fast, warm_up
from qstream.format.mxfp4 import NonFiniteError, Quantized
from qstream.format.rules import Rule
from qstream.io.checkpoint import CONFIG_NAME, SourceTensor
from qstream.io.device_reader import DeviceReader
from qstream.io.safetensors_io import read_header
from qstream.io.shards import PARTIAL, shard_file, write_index
from qstream.io.source_formats import PackedExperts
from qstream.io.staging import copy_side_files, staging, write_json
from qstream.planning.plan import CopyJob, Job, Plan, QuantJob, Shard


class Calibrated(Protocol):
    """A calibrated method's per-module data (imatrix channel weights: qstream.calib.channel_weights; sequential
    GPTQ's solved modules: qstream.calib.sequential), built by the command from calibration: the pipeline's one
    door to calibration, so convert/ imports no calib/."""

    method: str  # the Method value the report records as its rule

    def for_job(self, job: QuantJob) -> Any | None:
        """A module's calibrated data, or None when it has none (quantized with plan.rule)."""

    def quantize(self, w: torch.Tensor, data: Any, row: int) -> Quantized:
        """Whole rows w [rows, in] of one module, from its first row `row` on, with its data."""

    def fingerprint(self) -> dict:
        """What a resumed run must find unchanged."""

    def describe(self) -> dict:
        """The settings and what calibration gave each module, for the report."""


class ShardRunner(Protocol):
    """Writes the shards a run still needs elsewhere than in this process (qstream.convert.scale_out: as Ray
    tasks), each with `_write_shard`; the run keeps the plan, resume, the report and publishing."""

    def __call__(self, plan: Plan, todo: Sequence[int], tmp: Path, calibrated: Calibrated | None,
                 advance: Callable[[int], None]) -> Iterator[tuple[int, dict]]:
        """Writes plan.shards[i] for each i in todo into tmp; yields (i, its saved statistics) as each is done."""

    def describe(self) -> dict:
        """Where the shards were written, for the report."""


STATS_SUFFIX = ".stats.json"  # per finished shard: its quantization statistics, for resumed reports
READ_AHEAD = 2  # chunks read ahead of the quantizer
WRITE_BEHIND = 6  # writes queued behind it (a chunk is two writes)


@dataclass
class TensorStats:
    """Accumulated over every slice of one source tensor; a fused experts tensor [E, out, in] also per expert."""

    shape: tuple[int, ...]
    sq_error: float = 0.0
    sq_norm: float = 0.0
    offsets: list[int] = field(default_factory=lambda: [0, 0, 0])
    lossless: bool = False  # copied from MXFP4 already in the source (gpt-oss): no error, no rule
    weighted: int = 0  # modules (experts) quantized by a calibrated method
    fallback: int = 0  # modules of a calibrated run without calibration data: plan.rule
    expert_sq: list[list[float]] = field(default_factory=list)  # fused experts: [sq_error per expert, sq_norm per]

    def __post_init__(self) -> None:
        if len(self.shape) == 3 and not self.expert_sq:
            self.expert_sq = [[0.0] * self.shape[0], [0.0] * self.shape[0]]

    def add(self, q: Quantized, expert: int = 0) -> None:
        self.sq_error += q.sq_error
        self.sq_norm += q.sq_norm
        self.offsets = [a + b for a, b in zip(self.offsets, q.offset_counts)]
        if self.expert_sq:
            self.expert_sq[0][expert] += q.sq_error
            self.expert_sq[1][expert] += q.sq_norm

    def as_state(self) -> dict:
        return {"shape": list(self.shape), "sq_error": self.sq_error, "sq_norm": self.sq_norm, "offsets": self.offsets,
                "lossless": self.lossless, "weighted": self.weighted, "fallback": self.fallback,
                "expert_sq": self.expert_sq}

    def merge_state(self, state: dict) -> None:
        self.lossless = state["lossless"]
        self.sq_error += state["sq_error"]
        self.sq_norm += state["sq_norm"]
        self.offsets = [a + b for a, b in zip(self.offsets, state["offsets"])]
        self.weighted += state["weighted"]
        self.fallback += state["fallback"]
        self.expert_sq = [[a + b for a, b in zip(mine, theirs)] for mine, theirs in zip(self.expert_sq,
                                                                                        state["expert_sq"])]

    def as_json(self, name: str, rule: str) -> dict:
        blocks = sum(self.offsets) or 1
        out = {
            "name": name,
            "shape": list(self.shape),
            "rule": "lossless (source MXFP4)" if self.lossless else rule,
            "rel_error": self.sq_error / self.sq_norm if self.sq_norm else 0.0,
            "sq_error": self.sq_error,
            "sq_norm": self.sq_norm,
            "exponent_share": {f"R-{s}": c / blocks for s, c in enumerate(self.offsets)},
        }
        if self.expert_sq:  # per expert of a fused tensor: the card's expert table and plot
            out["expert_sq_error"], out["expert_sq_norm"] = self.expert_sq
        if self.weighted + self.fallback:  # a calibrated run: which modules had calibration data
            modules = self.weighted + self.fallback
            out["rule"] = (f"{rule} (mse3 for {self.fallback} of {modules} modules: no statistics)"
                           if self.fallback and self.weighted else rule if self.weighted else "mse3 (no statistics)")
            out["modules_calibrated"], out["modules_fallback"] = self.weighted, self.fallback
        return out


# What the reader hands the quantizer per chunk: rows read, or MXFP4 already (a (packed, scales) pair from a
# pre-quantized source).
Chunk = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _read_items(jobs: Iterator[Job], onto: DeviceReader | None = None) -> Iterator[tuple[Job, int, Chunk]]:
    """(job, first output row, data) per chunk of at most CHUNK_ELEMENTS source elements (jobs that read: not
    byte copies). With `onto`, rows stored as they are quantized are read straight onto its device (CUDA: through
    pinned buffers, copied on the reading thread's own stream while the quantizer runs)."""
    for job in jobs:
        src = job.source
        if isinstance(job, CopyJob):
            for a, b in row_chunks(*src.info.row_shape, max_elements=CHUNK_ELEMENTS):
                yield job, a, src.read_rows(a, b)
            continue
        for a, b in row_chunks(job.rows, job.in_features, CHUNK_ELEMENTS):
            r0, r1 = job.row_start + a * job.row_step, job.row_start + (b - 1) * job.row_step + 1
            if isinstance(src, PackedExperts):
                yield job, a, src.read_packed(r0, r1, job.row_step)
            elif onto is not None and isinstance(src, SourceTensor):
                yield job, a, onto.rows(src, r0, r1)[:: job.row_step]
            else:
                yield job, a, src.read_rows(r0, r1)[:: job.row_step]


def _quantize_chunk(job: QuantJob, row: int, w: torch.Tensor, rule: Rule, device: torch.device,
                    calibrated: Calibrated | None = None, data: Any = None) -> Quantized:
    """Rows of one module under `rule`, or by the calibrated method with the module's `data` (the torch
    path: the C and Triton kernels implement the data-free rules only)."""
    try:
        if calibrated is not None and data is not None:
            return calibrated.quantize(w.to(device, non_blocking=True), data, row)
        return quantize_fast(w.to(device, non_blocking=True), rule)
    except NonFiniteError as exc:
        r0 = job.row_start + row * job.row_step
        raise QstreamError(f"{job.source.name}: {exc} in rows from {r0}; fix the source weights") from exc


def _write_shard(shard: Shard[Job], tmp: Path, plan: Plan, device: torch.device,
                 advance: Callable[[int], None], calibrated: Calibrated | None = None,
                 partial_suffix: str = PARTIAL, clock: Clock | None = None) -> dict:
    """Write one shard, reading ahead and writing behind; it takes its name only when complete.

    Tensors copied byte for byte (embeddings, norms, attention of an experts-only run) need no reading: they are
    all handed at once to a thread of their own, which copies them in the kernel (copy_file_range) while the
    quantization runs beside it. Every write lands at its final offset, so the order changes no byte.
    Its quantization statistics are saved beside it first, so a resumed run can skip it whole.
    With `calibrated`, each module's calibration data is read once, as its first rows arrive.
    """
    clock = clock or Clock()
    stats: dict[str, TensorStats] = {}
    current: tuple[Job | None, Any] = (None, None)  # the module in flight and its calibration data
    copies = [j for j in shard.jobs if isinstance(j, CopyJob) and j.source.copyable]
    reads = [j for j in shard.jobs if not (isinstance(j, CopyJob) and j.source.copyable)]
    with (shard_file(tmp, shard.file_name, shard.entries, partial_suffix) as writer,
          OrderedWriter(WRITE_BEHIND) as writes,
          OrderedWriter(len(copies) + 1) as copier):
        for c in copies:
            copier.submit(writer.copy_from, c.source.name, c.source.file, c.source.info)
            advance(c.bytes_in)
        onto = DeviceReader(device) if device.type == "cuda" else None
        for job, row, w in clock.timed(prefetch(_read_items(iter(reads), onto), READ_AHEAD), "read wait"):
            copier.poll()
            if isinstance(job, CopyJob):  # decoded from FP8 and friends: written as its logical dtype
                assert isinstance(w, torch.Tensor)
                with clock.stage("write wait"):
                    writes.submit(writer.write, job.source.name, w, row * job.entries[0].row_nbytes)
                advance(w.numel() * w.element_size())
                continue
            st = stats.setdefault(job.source.name, TensorStats(job.source.info.shape))
            if isinstance(w, tuple):  # already MXFP4 in the source: a lossless copy
                packed, scales = w
                st.lossless = True
                advance(packed.numel() + scales.numel())
            elif isinstance(w, torch.Tensor):
                if calibrated is not None and current[0] is not job:
                    current = (job, calibrated.for_job(job))
                    st.weighted += current[1] is not None
                    st.fallback += current[1] is None
                with clock.stage("quantize"):
                    q = _quantize_chunk(job, row, w, plan.rule, device, calibrated, current[1])
                    packed, scales = q.packed.cpu(), q.scales.cpu()
                st.add(q, job.row_start // job.source.info.shape[1] if len(job.source.info.shape) == 3 else 0)
                advance(w.numel() * w.element_size())
            with clock.stage("write wait"):
                for entry, data in zip(job.entries, (packed, scales)):
                    writes.submit(writer.write, entry.name, data, row * entry.row_nbytes)
        with clock.stage("write wait"):
            writes.drain()
        with clock.stage("copy wait"):
            copier.drain()
        saved = {name: st.as_state() for name, st in stats.items()}
        write_json(tmp / f"{shard.file_name}{STATS_SUFFIX}", saved)
        closing = time.perf_counter()
    clock.seconds["sync and close"] = clock.seconds.get("sync and close", 0.0) + time.perf_counter() - closing
    return saved


def _in_process(device: torch.device, clock: Clock) -> Callable[..., Iterator[tuple[int, dict]]]:
    """The default runner: the shards one after the other, in this process."""

    def write(plan: Plan, todo: Sequence[int], tmp: Path, calibrated: Calibrated | None,
              advance: Callable[[int], None]) -> Iterator[tuple[int, dict]]:
        for i in todo:
            yield i, _write_shard(plan.shards[i], tmp, plan, device, advance, calibrated, clock=clock)

    return write


def _completed_shard(tmp: Path, shard: Shard[Job]) -> dict | None:
    """The saved statistics of a shard an earlier run finished, or None if it must be redone."""
    path, stats_path = tmp / shard.file_name, tmp / f"{shard.file_name}{STATS_SUFFIX}"
    if not (path.exists() and stats_path.exists()):
        return None
    try:
        header = read_header(path)
        saved = json.loads(stats_path.read_text())
    except (QstreamError, json.JSONDecodeError):
        return None
    expected = {e.name: (e.dtype, e.shape) for e in shard.entries}
    found = {n: (i.dtype, i.shape) for n, i in header.tensors.items()}
    return saved if found == expected else None


def fingerprint(plan: Plan, calibrated: Calibrated | None = None) -> dict:
    """What must match for a resumed run to continue an earlier one: source files, settings, layout."""
    extra = {calibrated.method: calibrated.fingerprint()} if calibrated else {}
    return {**extra,
        "qstream_version": __import__("qstream").__version__,
        "source": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in plan.source.weight_files],
        "rule": plan.rule.value,
        "keep_dtype": plan.keep_dtype,
        "selection": [plan.selection.preset, list(plan.selection.include), list(plan.selection.exclude),
                      plan.selection.skip_indivisible],
        "shards": [[s.file_name, [[e.name, e.dtype, list(e.shape)] for e in s.entries]] for s in plan.shards],
    }


def run(plan: Plan, dst: Path, device: str = "auto", overwrite: bool = False, progress: bool = True,
        resume: bool = False, finish: Callable[[Path], None] | None = None,
        calibrated: Calibrated | None = None, shards: ShardRunner | None = None) -> dict:
    """Quantize per the plan into dst; returns the report that is also written to dst.

    Every run records its fingerprint, so a run killed at any point can be finished by the
    same command with `resume=True`, redoing at most the shard that was in flight. `finish`
    gets the complete but unpublished output directory (the command's own last steps). With
    `calibrated` (a calibrated method's data checked against this plan), modules are quantized by it.
    `shards` writes the shards elsewhere (Ray tasks); the output is the same bytes, statistics merged in plan order.
    """
    dev = resolve_device(device)
    t0 = time.perf_counter()
    if shards is None:  # the kernel's start (CUDA, Triton) overlaps the staging and the first reads
        warm_up(dev, plan.rule)
    stats: dict[str, TensorStats] = {}
    clock = Clock()
    fp = fingerprint(plan, calibrated)
    with staging(plan.source.root, dst, overwrite, "qstream quantize", fingerprint=fp, resume=resume,
                 bookkeeping=(f"*{STATS_SUFFIX}",)) as tmp:
        clock.seconds["start"] = time.perf_counter() - t0
        with tqdm(total=plan.work_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="quantize",
                  disable=not progress, dynamic_ncols=True) as bar:
            saved: dict[int, dict] = {}
            for i, shard in enumerate(plan.shards):
                done = _completed_shard(tmp, shard) if resume else None
                if done is not None:
                    saved[i] = done
                    bar.update(sum(j.bytes_in for j in shard.jobs))
            todo = [i for i in range(len(plan.shards)) if i not in saved]
            written = (shards or _in_process(dev, clock))(plan, todo, tmp, calibrated, bar.update)
            saved.update(written)
        for i in range(len(plan.shards)):  # in plan order: the same sums however the shards were written
            for name, state in saved[i].items():
                stats.setdefault(name, TensorStats(tuple(state["shape"]))).merge_state(state)
        with clock.stage("index and side files"):
            write_index(tmp, [(s.file_name, s.entries) for s in plan.shards])
            write_json(tmp / CONFIG_NAME, plan.output_config())
            side_files = copy_side_files(plan.source.root, tmp)
        report = _report(plan, stats, time.perf_counter() - t0, dev, side_files, calibrated, clock,
                         shards.describe() if shards else None)
        write_json(tmp / REPORT_NAME, report)
        if finish is not None:
            finish(tmp)
    return report


def _report(plan: Plan, stats: dict[str, TensorStats], seconds: float, dev: torch.device,
            side_files: list[str], calibrated: Calibrated | None, clock: Clock, scale_out: dict | None = None) -> dict:
    rule = calibrated.method if calibrated else plan.rule.value
    tensors = [stats[name].as_json(name, rule) for name in plan.quantized_sources]
    extra = {rule: {**calibrated.describe(), "fallback_rule": plan.rule.value,
                    "modules_calibrated": sum(s.weighted for s in stats.values()),
                    "modules_fallback": sum(s.fallback for s in stats.values()),
                    "tensors_with_fallback": [n for n in plan.quantized_sources if stats[n].fallback]}
             } if calibrated else {}
    params = sum(t.info.numel for n, t in plan.source.tensors.items() if plan.decisions[n].quantize)
    err = sum(s.sq_error for s in stats.values())
    norm = sum(s.sq_norm for s in stats.values())
    return {
        "qstream_version": __import__("qstream").__version__,
        "source": str(plan.source.root.resolve()),  # absolute: `qstream card` finds the source's card from anywhere
        "rule": rule,
        "preset": plan.selection.preset,
        "include": list(plan.selection.include),
        "exclude": list(plan.selection.exclude),
        "device": dev.type,
        "keep_dtype": plan.keep_dtype,
        "kept_source_formats": {fmt: sum(m.fmt == fmt for m in plan.modules) for fmt, _ in plan.kept_schemes},
        "ignore": list(plan.ignore),
        **extra,
        **({"scale_out": scale_out} if scale_out else {}),
        "totals": {
            "tensors_quantized": len(tensors),
            "params_quantized": params,
            "params_total": sum(t.info.numel for t in plan.source.tensors.values()),
            "bytes_in": plan.bytes_in,
            "bytes_out": plan.bytes_out,
            "rel_error": err / norm if norm else 0.0,
            "seconds": seconds,
            "stages": clock.seconds,  # this process's: shards written elsewhere (scale_out) time themselves
            "peak_rss_bytes": peak_rss_bytes(),
            "shards": len(plan.shards),
        },
        "copied_files": side_files,
        "tensors": tensors,
    }
