"""The source checks of `qstream verify --source`: every source tensor accounted for, each quantized block
within its error bound.

The error bound: a block's exponent is fixed by its rule, and nearest rounding under a fixed exponent has
one error whatever the tie-breaking, so a correct output has, block for block, exactly the squared error
of re-quantizing the source with the same rule (check.error_bound). The rule comes from DST's
qstream_report.json; without one, each block is held to the worst of all rules; an imatrix output to
its candidate set and nearest codes (check.error_bound.Bound). The source is
re-quantized with the torch path (`mxfp4.quantize`), not the C/Triton kernels `quantize` writes with, so
a kernel bug cannot vouch for itself; on a GPU that costs about what quantizing did.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from qstream.check.error_bound import Bound
from qstream.check.verify_report import Check
from qstream.common import read_report, row_chunks
from qstream.errors import QstreamError
from qstream.format.formats import KEPT_FP8_DTYPES, MXFP4_FORMAT, PACKED, SCALE
from qstream.format.mxfp4 import NonFiniteError
from qstream.format.rules import Method, Rule
from qstream.io.checkpoint import CONFIG_NAME, Checkpoint, CheckpointTensor, SourceTensor
from qstream.io.safetensors_io import read_rows
from qstream.io.source_formats import PackedExperts, decode_checkpoint
from qstream.planning.plan import QuantJob, quant_jobs

CHUNK_ELEMENTS = 4 * 1024 * 1024  # source elements held at once
HASH_CHUNK = 16 * 1024 * 1024


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


def against_source(src: Checkpoint[SourceTensor], out: Checkpoint[SourceTensor], bound: Bound,
                   dev: torch.device) -> list[Check]:
    """Every source tensor copied (bytes, or a decoded one's values), kept in its source precision (bytes), or
    quantized; each quantized module within its error bound. The source is seen as the planner sees it:
    FP8/MXFP8 weights decoded, gpt-oss experts as their packed rows."""
    coverage = Check("source tensors")
    errors = Check("error bound")
    tally = Tally()
    produced: set[str] = set()
    counts: dict[str, int] = defaultdict(int)
    decoded = decode_checkpoint(src)
    for name, st in decoded.tensors.items():
        stored = st.stored
        if stored and all(s.name in out.tensors for s in stored) and out.tensors[name].info.dtype in KEPT_FP8_DTYPES:
            produced.update(s.name for s in stored)
            counts["kept in source precision"] += 1
            for s in stored:
                coverage.failures += _copy_problems(s, out.tensors[s.name])
            continue
        if name in out.tensors:
            produced.add(name)
            counts["copied"] += 1
            coverage.failures += _copy_problems(st, out.tensors[name])
            continue
        try:
            jobs = quant_jobs(decoded, st)
        except QstreamError:
            jobs = []
        present = [j for j in jobs if j.module + PACKED in out.tensors and j.module + SCALE in out.tensors]
        if not jobs or len(present) < len(jobs):
            lack = next((f" nor {j.module}{PACKED}" for j in jobs if j not in present), "")
            coverage.failures.append(f"{name}: neither copied nor quantized (the output has no {name}{lack})")
            continue
        counts["quantized"] += 1
        for job in jobs:
            produced.update((job.module + PACKED, job.module + SCALE))
            if isinstance(st, PackedExperts):
                problem = _lossless_error(job, st, out)
            else:
                problem = _job_error(job, out, bound, dev, tally)
            if problem:
                errors.failures.append(problem)
    coverage.failures += [f"{n}: in the output but made from no source tensor"
                          for n in out.tensors if n not in produced]
    config = {k: v for k, v in out.config.items() if k != "quantization_config"}
    if config != decoded.config:
        keys = sorted(k for k in config.keys() | decoded.config.keys() if config.get(k) != decoded.config.get(k))
        coverage.failures.append(f"{out.root / CONFIG_NAME}: differs from the source's beyond quantization_config "
                                 f"(keys {keys[:5]})")
    coverage.detail = f"{len(decoded.tensors)} source tensors: " + ", ".join(f"{n} {k}" for k, n in counts.items())
    errors.detail = tally.detail(bound)
    return [coverage, errors]


def _sha256(st: CheckpointTensor) -> str:
    """sha256 of a tensor's bytes in its file (a copyable one: its info locates them)."""
    h = hashlib.sha256()
    with open(st.file, "rb", buffering=0) as f:
        f.seek(st.info.start)
        left = st.info.nbytes
        while left:
            chunk = f.read(min(HASH_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _copy_problems(src: CheckpointTensor, out: SourceTensor) -> list[str]:
    """A copied tensor: same dtype and shape, and the same bytes (sha256), or for one computed from
    the source (decoded FP8, a gpt-oss bias slice) the same values."""
    a, b = src.info, out.info
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return [f"{a.name}: {b.dtype}{list(b.shape)} in the output, {a.dtype}{list(a.shape)} in the source"]
    if src.copyable:
        return [] if _sha256(src) == _sha256(out) else [f"{a.name}: copied bytes differ from the source (sha256)"]
    for r0, r1 in row_chunks(*a.row_shape, max_elements=CHUNK_ELEMENTS):
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


def _job_error(job: QuantJob, out: Checkpoint[SourceTensor], bound: Bound, dev: torch.device,
               tally: Tally) -> str | None:
    """Stream one module's source rows and output bytes through the bound; a line if it fails."""
    src = job.source
    packed, scale = out.tensors[job.module + PACKED], out.tensors[job.module + SCALE]
    rows, n = job.row_end - job.row_start, job.in_features
    f = MXFP4_FORMAT
    if packed.info.shape != (rows, f.stored_width(n)) or not f.scale_fits((rows, n), scale.info.shape):
        return (f"{job.module}: packed {list(packed.info.shape)} / scale {list(scale.info.shape)} do not fit "
                f"source rows {job.row_start}..{job.row_end} of {src.name} ({rows} x {n})")
    over = blocks = 0
    worst, identical = 1.0, True
    for r0, r1 in row_chunks(rows, n, CHUNK_ELEMENTS):
        w = src.read_rows(job.row_start + r0, job.row_start + r1).to(dev)
        try:
            c = bound.compare(w, read_rows(packed.file, packed.info, r0, r1).to(dev),
                              read_rows(scale.file, scale.info, r0, r1).to(dev))
        except NonFiniteError as exc:
            return f"{src.name}: {exc} in rows {job.row_start + r0}..{job.row_start + r1}"
        over, blocks, worst = over + c.over, blocks + c.blocks, max(worst, c.worst)
        identical &= c.identical
        tally.sq_error += c.sq_error
        tally.sq_norm += c.sq_norm
    tally.modules += 1
    tally.identical += identical
    tally.blocks += blocks
    return bound.failure(job.module, over, blocks, worst) if over else None


@dataclass
class Tally:
    """Totals over every quantized module, for the error check's one-line detail."""

    modules: int = 0
    identical: int = 0  # modules byte-identical to re-quantizing the source with a rule
    blocks: int = 0
    sq_error: float = 0.0
    sq_norm: float = 0.0

    def detail(self, bound: Bound) -> str:
        rel = self.sq_error / self.sq_norm if self.sq_norm else 0.0
        head = f"{self.modules} modules, {self.blocks} blocks, rel. error {rel:.3e}; "
        if bound.depth is not None:
            return head + f"every exponent within R-{bound.depth}..R and every code nearest under it"
        return head + f"{self.identical} modules byte-identical to rule {bound.name} re-run on the source"
