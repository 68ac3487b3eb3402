"""The source checks of `qstream verify --source`: every source tensor accounted for, each quantized block
within its error bound.

The error bound: a block's exponent is fixed by its rule, and nearest rounding under a fixed exponent has
one error whatever the tie-breaking, so a correct output has, block for block, exactly the squared error
of re-quantizing the source with the same rule (check.error_bound). The rule comes from DST's
qstream_report.json; without one, each block is held to the worst of all rules; an imatrix output to
its candidate set and nearest codes (check.error_bound.Bound).

By default every block is re-quantized with the fast kernels `quantize` writes with (C on CPU, Triton on CUDA)
and compared with the output (check.error_bound.compare_fast), while the kernels are held to the independent
torch path (`mxfp4.quantize`) on a seeded random sample of the blocks of every tensor (check.kernel_audit, which
states how surely a kernel bug is caught), so a kernel bug cannot vouch for itself. `full=True` (`--full`)
re-quantizes every block through the torch path instead, as slow as that is. Both read ahead on a thread, as
`quantize` does, and compare copied tensors there, so the disk and the cores work at once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from qstream.check.error_bound import Bound, ChunkComparison, compare_fast
from qstream.check.kernel_audit import DEFAULT_SAMPLING, KernelAudit, Sampling
from qstream.check.verify_report import Check
from qstream.common import CHUNK_ELEMENTS, read_report, row_chunks
from qstream.convert.streams import prefetch
from qstream.errors import QstreamError
from qstream.format.formats import KEPT_FP8_DTYPES, MXFP4_FORMAT, PACKED, SCALE
from qstream.format.kernels import backend_name, quantize_fast
from qstream.format.mxfp4 import BLOCK, NonFiniteError
from qstream.format.rules import Method, Rule
from qstream.io.checkpoint import CONFIG_NAME, Checkpoint, CheckpointTensor, SourceTensor
from qstream.io.safetensors_io import read_rows
from qstream.io.source_formats import PackedExperts, decode_checkpoint
from qstream.planning.plan import QuantJob, quant_jobs

TORCH_CHUNK_ELEMENTS = 4 * 1024 * 1024  # source elements the torch path (--full) holds at once
COMPARE_BYTES = 16 * 1024 * 1024  # bytes of a copied tensor compared at once
READ_AHEAD = 2  # chunks read ahead of the comparison


def recorded_bound(dst: Path) -> Bound:
    """The bound of the rule DST's report records; every rule's when unknown."""
    try:
        report = read_report(dst)
        if report["rule"] in (Method.IMATRIX.value, Method.GPTQ.value):
            method = Method(report["rule"])
            return Bound(depth=int(report[method.value]["depth"]), method=method)
        return Bound((Rule(report["rule"]),))
    except (OSError, ValueError, KeyError, TypeError):
        return Bound()


@dataclass(frozen=True)
class _Found:
    """Failures known without the comparison's compute: `check` is 0 (source tensors) or 1 (error bound)."""

    check: int
    failures: list[str]


@dataclass(frozen=True)
class _CopyWork:
    src: CheckpointTensor
    out: SourceTensor


@dataclass(frozen=True)
class _LosslessWork:
    job: QuantJob
    experts: PackedExperts


@dataclass(frozen=True)
class _JobChunk:
    """Source rows r0..r1 of a quantized module and the output's bytes for them."""

    job: QuantJob
    r0: int
    r1: int
    w: torch.Tensor
    packed: torch.Tensor
    scales: torch.Tensor
    last: bool


_Work = _Found | _CopyWork | _LosslessWork | QuantJob


def against_source(src: Checkpoint[SourceTensor], out: Checkpoint[SourceTensor], bound: Bound,
                   dev: torch.device, full: bool = False, sampling: Sampling = DEFAULT_SAMPLING) -> list[Check]:
    """Every source tensor copied (bytes, or a decoded one's values), kept in its source precision (bytes), or
    quantized; each quantized module within its error bound (with the fast kernels and a sampled torch audit of
    them, or with the torch path on every block when `full`). The source is seen as the planner sees it:
    FP8/MXFP8 weights decoded, gpt-oss experts as their packed rows."""
    checks = Check("source tensors"), Check("error bound")
    decoded = decode_checkpoint(src)
    work, produced, counts = _work(decoded, out)
    found: list[_Found | Future[_Found]] = []  # source tensors' failures, in order (copies compared on a thread)
    quantized = _Quantized(bound, dev, None if full else KernelAudit(sampling, backend_name(dev)), checks[1])
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qstream-compare") as copies:
        for item in prefetch(_read(work, out, TORCH_CHUNK_ELEMENTS if full else CHUNK_ELEMENTS, copies), READ_AHEAD):
            if isinstance(item, _JobChunk):
                quantized.compare(item)
            elif isinstance(item, Future) or item.check == 0:
                found.append(item)
            else:
                checks[1].failures += item.failures
        for f in found:
            checks[0].failures += (f.result() if isinstance(f, Future) else f).failures
    checks[0].failures += [f"{n}: in the output but made from no source tensor"
                           for n in out.tensors if n not in produced]
    config = {k: v for k, v in out.config.items() if k != "quantization_config"}
    if config != decoded.config:
        keys = sorted(k for k in config.keys() | decoded.config.keys() if config.get(k) != decoded.config.get(k))
        checks[0].failures.append(f"{out.root / CONFIG_NAME}: differs from the source's beyond quantization_config "
                                  f"(keys {keys[:5]})")
    checks[0].detail = f"{len(decoded.tensors)} source tensors: " + ", ".join(f"{n} {k}" for k, n in counts.items())
    quantized.finish()
    return list(checks)


class _Quantized:
    """The error-bound check of quantized modules, fed chunk by chunk in order."""

    def __init__(self, bound: Bound, dev: torch.device, audit: KernelAudit | None, check: Check) -> None:
        self.bound, self.dev, self.audit, self.check = bound, dev, audit, check
        self.tally = Tally()
        self.module = _Module()
        self.samples: dict[str, torch.Tensor | None] = {}

    def compare(self, item: _JobChunk) -> None:
        job = item.job
        if self.module.job is not job:
            self.module = _Module(job)
        module = self.module
        if module.failed:
            return
        w, packed, scales = (t.to(self.dev, non_blocking=True) for t in (item.w, item.packed, item.scales))
        try:
            if self.audit is None:
                c = self.bound.compare(w, packed, scales)
            else:
                c, ran = compare_fast(w, packed, scales, self.bound, quantize_fast)
                self.audit.add(job.source.name, self._sampled(item, self.audit.sampling), w, ran)
        except NonFiniteError as exc:
            module.failed = True
            rows = f"{job.row_start + item.r0}..{job.row_start + item.r1}"
            self.check.failures.append(f"{job.source.name}: {exc} in rows {rows}")
            return
        module.add(c)
        if item.last:
            self.tally.add(module)
            if module.over:
                self.check.failures.append(self.bound.failure(job.module, module.over, module.blocks, module.worst))

    def _sampled(self, item: _JobChunk, sampling: Sampling) -> torch.Tensor | None:
        """The chunk's blocks in its tensor's sample, as flat indices into the chunk (None: all)."""
        job, name = item.job, item.job.source.name
        if name not in self.samples:
            self.samples[name] = sampling.blocks(name, job.source.info.numel // BLOCK)
        sample = self.samples[name]
        if sample is None:
            return None
        bpr = job.in_features // BLOCK
        lo, hi = (job.row_start + item.r0) * bpr, (job.row_start + item.r1) * bpr
        a, b = torch.searchsorted(sample, torch.tensor([lo, hi])).tolist()
        return sample[a:b] - lo

    def finish(self) -> None:
        self.check.detail = self.tally.detail(self.bound)
        if self.audit is None:
            self.check.detail += "; every block re-quantized by the torch path (--full)"
        else:
            self.check.failures += self.audit.failures()
            self.check.detail += "; " + self.audit.detail()


def _work(decoded: Checkpoint[CheckpointTensor], out: Checkpoint[SourceTensor]
          ) -> tuple[list[_Work], set[str], dict[str, int]]:
    """What to compare, in source order, from the headers alone: (work, output names accounted for, counts)."""
    work: list[_Work] = []
    produced: set[str] = set()
    counts: dict[str, int] = defaultdict(int)
    for name, st in decoded.tensors.items():
        stored = st.stored
        if stored and all(s.name in out.tensors for s in stored) and out.tensors[name].info.dtype in KEPT_FP8_DTYPES:
            produced.update(s.name for s in stored)
            counts["kept in source precision"] += 1
            work += [_CopyWork(s, out.tensors[s.name]) for s in stored]
            continue
        if name in out.tensors:
            produced.add(name)
            counts["copied"] += 1
            work.append(_CopyWork(st, out.tensors[name]))
            continue
        try:
            jobs = quant_jobs(decoded, st)
        except QstreamError:
            jobs = []
        present = [j for j in jobs if j.module + PACKED in out.tensors and j.module + SCALE in out.tensors]
        if not jobs or len(present) < len(jobs):
            lack = next((f" nor {j.module}{PACKED}" for j in jobs if j not in present), "")
            work.append(_Found(0, [f"{name}: neither copied nor quantized (the output has no {name}{lack})"]))
            continue
        counts["quantized"] += 1
        for job in jobs:
            produced.update((job.module + PACKED, job.module + SCALE))
            if isinstance(st, PackedExperts):
                work.append(_LosslessWork(job, st))
                continue
            misfit = _misfit(job, out)
            work.append(_Found(1, [misfit]) if misfit else job)
    return work, produced, counts


def _read(work: list[_Work], out: Checkpoint[SourceTensor], chunk: int,
          copies: ThreadPoolExecutor) -> Iterator[_Found | Future[_Found] | _JobChunk]:
    """Run on the reader thread: copies handed to `copies` to compare, lossless modules compared outright,
    quantized modules read in row chunks of at most `chunk` source elements beside the output's bytes for them."""
    for item in work:
        if isinstance(item, _Found):
            yield item
        elif isinstance(item, _CopyWork):
            yield copies.submit(lambda c: _Found(0, _copy_problems(c.src, c.out)), item)
        elif isinstance(item, _LosslessWork):
            problem = _lossless_error(item.job, item.experts, out)
            yield _Found(1, [problem] if problem else [])
        else:
            packed, scale = out.tensors[item.module + PACKED], out.tensors[item.module + SCALE]
            rows, n = item.rows, item.in_features
            for r0, r1 in row_chunks(rows, n, chunk):
                yield _JobChunk(item, r0, r1, item.source.read_rows(item.row_start + r0, item.row_start + r1),
                                read_rows(packed.file, packed.info, r0, r1), read_rows(scale.file, scale.info, r0, r1),
                                r1 == rows)


def _same_bytes(a: CheckpointTensor, b: SourceTensor) -> int | None:
    """The offset of the first COMPARE_BYTES piece where two tensors' bytes in their files differ; None if equal."""
    with open(a.file, "rb", buffering=0) as fa, open(b.file, "rb", buffering=0) as fb:
        fa.seek(a.info.start)
        fb.seek(b.info.start)
        for off in range(0, a.info.nbytes, COMPARE_BYTES):
            n = min(COMPARE_BYTES, a.info.nbytes - off)
            if fa.read(n) != fb.read(n):
                return off
    return None


def _copy_problems(src: CheckpointTensor, out: SourceTensor) -> list[str]:
    """A copied tensor: same dtype and shape, and the same bytes, or for one computed from
    the source (decoded FP8, a gpt-oss bias slice) the same values."""
    a, b = src.info, out.info
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return [f"{a.name}: {b.dtype}{list(b.shape)} in the output, {a.dtype}{list(a.shape)} in the source"]
    if src.copyable:
        off = _same_bytes(src, out)
        return [] if off is None else [f"{a.name}: copied bytes differ from the source from byte {off}"]
    for r0, r1 in row_chunks(*a.row_shape, max_elements=TORCH_CHUNK_ELEMENTS):
        if not torch.equal(src.read_rows(r0, r1).reshape(-1), out.read_rows(r0, r1).reshape(-1)):
            return [f"{a.name}: values differ from the source's decoded values from row {r0}"]
    return []


def _lossless_error(job: QuantJob, experts: PackedExperts, out: Checkpoint[SourceTensor]) -> str | None:
    """A module already MXFP4 in the source: its packed codes and scales are copied exactly."""
    packed, scales = experts.read_packed(job.row_start, job.row_end, job.row_step)
    got = out.tensors[job.module + PACKED], out.tensors[job.module + SCALE]
    same = all(g.info.shape == tuple(w.shape) and torch.equal(g.read_rows(0, g.info.shape[0]), w)
               for g, w in zip(got, (packed, scales)))
    return None if same else f"{job.module}: differs from the source's MXFP4 bytes (a lossless copy was expected)"


def _misfit(job: QuantJob, out: Checkpoint[SourceTensor]) -> str | None:
    """A line if the output's packed/scale shapes do not fit the module's source rows."""
    packed, scale = out.tensors[job.module + PACKED], out.tensors[job.module + SCALE]
    rows, n, f = job.rows, job.in_features, MXFP4_FORMAT
    if packed.info.shape == (rows, f.stored_width(n)) and f.scale_fits((rows, n), scale.info.shape):
        return None
    return (f"{job.module}: packed {list(packed.info.shape)} / scale {list(scale.info.shape)} do not fit "
            f"source rows {job.row_start}..{job.row_end} of {job.source.name} ({rows} x {n})")


@dataclass
class _Module:
    """One quantized module's comparison, summed over its chunks."""

    job: QuantJob | None = None
    over: int = 0
    blocks: int = 0
    worst: float = 1.0
    identical: bool = True
    sq_error: float = 0.0
    sq_norm: float = 0.0
    failed: bool = False  # NaN or Inf in the source: reported, not compared further

    def add(self, c: ChunkComparison) -> None:
        self.over, self.blocks, self.worst = self.over + c.over, self.blocks + c.blocks, max(self.worst, c.worst)
        self.identical &= c.identical
        self.sq_error += c.sq_error
        self.sq_norm += c.sq_norm


@dataclass
class Tally:
    """Totals over every quantized module, for the error check's one-line detail."""

    modules: int = 0
    identical: int = 0  # modules byte-identical to re-quantizing the source with a rule
    blocks: int = 0
    sq_error: float = 0.0
    sq_norm: float = 0.0

    def add(self, m: _Module) -> None:
        self.modules += 1
        self.identical += m.identical
        self.blocks += m.blocks
        self.sq_error += m.sq_error
        self.sq_norm += m.sq_norm

    def detail(self, bound: Bound) -> str:
        rel = self.sq_error / self.sq_norm if self.sq_norm else 0.0
        head = f"{self.modules} modules, {self.blocks} blocks, rel. error {rel:.3e}; "
        if bound.depth is not None:
            return head + f"every exponent within R-{bound.depth}..R and every code nearest under it"
        return head + f"{self.identical} modules byte-identical to rule {bound.name} re-run on the source"
