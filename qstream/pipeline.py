"""Carry out a plan: stream tensors from the source shards into new shards, then publish.

Everything is written into a temporary directory beside DST, which is renamed into
place only once every shard, the config, the index and the report are on disk. A
shard is written as `<name>.partial` and renamed when closed, so a killed run can be
resumed shard by shard.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from qstream.checkpoint import CONFIG_NAME, INDEX_NAME, IN_PROGRESS_MARKER
from qstream.errors import QstreamError
from qstream.mxfp4 import BLOCK, NonFiniteError, Quantized, Rule, quantize
from qstream.plan import CopyJob, Plan, QuantJob, Shard
from qstream.safetensors_io import ShardWriter, read_rows

REPORT_NAME = "qstream_report.json"
CHUNK_ELEMENTS = 8 * 1024 * 1024  # elements quantized at once: bounds working memory
PLAN_NAME = ".qstream-plan.json"


@dataclass
class TensorStats:
    """Accumulated over every slice of one source tensor."""

    shape: tuple[int, ...]
    sq_error: float = 0.0
    sq_norm: float = 0.0
    offsets: list[int] = field(default_factory=lambda: [0, 0, 0])

    def add(self, q: Quantized) -> None:
        self.sq_error += q.sq_error
        self.sq_norm += q.sq_norm
        self.offsets = [a + b for a, b in zip(self.offsets, q.offset_counts)]

    def as_json(self, name: str, rule: str) -> dict:
        blocks = sum(self.offsets) or 1
        return {
            "name": name,
            "shape": list(self.shape),
            "rule": rule,
            "rel_error": self.sq_error / self.sq_norm if self.sq_norm else 0.0,
            "exponent_share": {f"R-{s}": c / blocks for s, c in enumerate(self.offsets)},
        }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise QstreamError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse destinations that would destroy the source or an existing checkpoint."""
    src, dst = src.resolve(), dst.resolve()
    if dst == src or src in dst.parents:
        raise QstreamError(f"{dst}: the output must not be the source or inside it; choose a directory elsewhere")
    if dst in src.parents:
        raise QstreamError(f"{dst}: the output must not contain the source; choose a directory elsewhere")
    if dst.exists() and not overwrite:
        raise QstreamError(f"{dst}: already exists; pass --overwrite to replace it or choose another directory")
    if not dst.parent.is_dir():
        raise QstreamError(f"{dst.parent}: does not exist; create it first")
    if not os.access(dst.parent, os.W_OK):
        raise QstreamError(f"{dst.parent}: not writable; choose a directory you can write to")


def temp_dir_for(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.qstream-partial"


def quantized_slices(job: QuantJob, rule: Rule, device: torch.device) -> Iterator[tuple[int, int, Quantized]]:
    """(first row, element bytes read, MXFP4) for each bounded row chunk of one output module."""
    n = job.in_features
    step = max(1, CHUNK_ELEMENTS // n)
    src = job.source
    for r0 in range(job.row_start, job.row_end, step):
        r1 = min(r0 + step, job.row_end)
        w = read_rows(src.file, src.info, r0, r1).to(device)
        try:
            yield r0 - job.row_start, w.numel() * w.element_size(), quantize(w, rule)
        except NonFiniteError as exc:
            raise QstreamError(f"{src.name}: {exc} in rows {r0}..{r1}; fix the source weights") from exc


def _write_quant_job(writer: ShardWriter, job: QuantJob, rule: Rule, device: torch.device,
                     stats: TensorStats, advance: Callable[[int], None]) -> None:
    n = job.in_features
    packed_name, scale_name = (e.name for e in job.entries)
    for row, nbytes, q in quantized_slices(job, rule, device):
        writer.write(packed_name, q.packed, row * (n // 2))
        writer.write(scale_name, q.scales, row * (n // BLOCK))
        stats.add(q)
        advance(nbytes)


def measure(plan: Plan, device: str = "auto") -> dict[str, TensorStats]:
    """Quantize every selected tensor as `run` would, writing nothing: errors and exponent shares."""
    dev = resolve_device(device)
    stats: dict[str, TensorStats] = {}
    for job in (j for s in plan.shards for j in s.jobs if isinstance(j, QuantJob)):
        st = stats.setdefault(job.source.name, TensorStats(job.source.info.shape))
        for _, _, q in quantized_slices(job, plan.rule, dev):
            st.add(q)
    return stats


def _write_shard(shard: Shard, tmp: Path, plan: Plan, device: torch.device,
                 stats: dict[str, TensorStats], advance: Callable[[int], None]) -> None:
    partial = tmp / f"{shard.file_name}.partial"
    writer = ShardWriter(partial, shard.entries, metadata={"format": "pt"})
    try:
        for job in shard.jobs:
            if isinstance(job, CopyJob):
                writer.copy_from(job.source.name, job.source.file, job.source.info)
                advance(job.bytes_in)
            else:
                info = job.source.info
                st = stats.setdefault(job.source.name, TensorStats(info.shape))
                _write_quant_job(writer, job, plan.rule, device, st, advance)
        writer.close()
    finally:
        writer.abort()
    os.replace(partial, tmp / shard.file_name)


def _copy_side_files(src: Path, tmp: Path, also_skip: frozenset[str] = frozenset()) -> list[str]:
    """Tokenizer, templates, licences, ...: every non-weight file, unchanged (but those in `also_skip`)."""
    skip = {CONFIG_NAME, INDEX_NAME, *also_skip}
    copied = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or path.suffix == ".safetensors" or str(rel) in skip or rel.parts[0].startswith("."):
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, tmp / rel)
        copied.append(str(rel))
    return copied


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _publish(tmp: Path, dst: Path) -> None:
    (tmp / IN_PROGRESS_MARKER).unlink()
    if dst.exists():
        trash = dst.parent / f".{dst.name}.qstream-old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dst, trash)
        os.replace(tmp, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(exc: OSError, tmp: Path) -> QstreamError:
    if exc.errno == errno.ENOSPC:
        return QstreamError(f"{tmp}: disk full ({exc.filename or 'while writing'}); free space and run again")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return QstreamError(f"{exc.filename or tmp}: not writable ({exc.strerror}); choose a writable output")
    return QstreamError(f"{exc.filename or tmp}: {exc.strerror}")


@contextlib.contextmanager
def staging(src: Path, dst: Path, overwrite: bool, writer: str) -> Iterator[Path]:
    """A fresh temp dir beside dst, marked unfinished, published as dst when the block succeeds.

    On any failure the temp dir is removed and dst is untouched; an OSError becomes a one-line QstreamError.
    """
    dst = Path(dst)
    check_destination(src, dst, overwrite)
    tmp = temp_dir_for(dst)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        (tmp / IN_PROGRESS_MARKER).write_text(f"{writer} is writing this directory\n")
        yield tmp
        _publish(tmp, dst)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(exc, tmp) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run(plan: Plan, dst: Path, device: str = "auto", overwrite: bool = False, progress: bool = True) -> dict:
    """Quantize per the plan into dst; returns the report that is also written to dst."""
    dst = Path(dst)
    check_destination(plan.source.root, dst, overwrite)
    dev = resolve_device(device)
    tmp = temp_dir_for(dst)
    t0 = time.perf_counter()
    stats: dict[str, TensorStats] = {}
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        (tmp / IN_PROGRESS_MARKER).write_text("qstream quantize is writing this directory\n")
        with tqdm(total=plan.bytes_in, unit="B", unit_scale=True, unit_divisor=1024, desc="quantize",
                  disable=not progress, dynamic_ncols=True) as bar:
            for shard in plan.shards:
                _write_shard(shard, tmp, plan, dev, stats, bar.update)
        index = {
            "metadata": {"total_size": plan.bytes_out},
            "weight_map": {e.name: s.file_name for s in plan.shards for e in s.entries},
        }
        _write_json(tmp / INDEX_NAME, index)
        _write_json(tmp / CONFIG_NAME, plan.output_config())
        side_files = _copy_side_files(plan.source.root, tmp)
        seconds = time.perf_counter() - t0
        report = _report(plan, stats, seconds, dev, side_files)
        _write_json(tmp / REPORT_NAME, report)
        _publish(tmp, dst)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(exc, tmp) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _report(plan: Plan, stats: dict[str, TensorStats], seconds: float, dev: torch.device, side_files: list[str]) -> dict:
    rule = plan.rule.value
    tensors = [stats[name].as_json(name, rule) for name in plan.quantized_sources]
    params = sum(t.info.numel for n, t in plan.source.tensors.items() if plan.decisions[n].quantize)
    err = sum(s.sq_error for s in stats.values())
    norm = sum(s.sq_norm for s in stats.values())
    return {
        "qstream_version": __import__("qstream").__version__,
        "source": str(plan.source.root),
        "rule": rule,
        "preset": plan.selection.preset,
        "include": list(plan.selection.include),
        "exclude": list(plan.selection.exclude),
        "device": dev.type,
        "ignore": list(plan.ignore),
        "totals": {
            "tensors_quantized": len(tensors),
            "params_quantized": params,
            "params_total": sum(t.info.numel for t in plan.source.tensors.values()),
            "bytes_in": plan.bytes_in,
            "bytes_out": plan.bytes_out,
            "rel_error": err / norm if norm else 0.0,
            "seconds": seconds,
            "peak_rss_bytes": peak_rss_bytes(),
            "shards": len(plan.shards),
        },
        "copied_files": side_files,
        "tensors": tensors,
    }
