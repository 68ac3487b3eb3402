"""compressed-tensors MXFP4 checkpoints back to dense BF16, for tools that cannot read MXFP4 and for eval.

Every `<m>.weight_packed` + `<m>.weight_scale` pair becomes `<m>.weight` (bf16, decoded by mxfp4.dequantize
in bounded row chunks: exact, since an E2M1 value times a power of two fits bf16); FP8/MXFP8 weights kept
beside them (a mixed-precision checkpoint) are decoded to bf16 as an FP8 input is; every other tensor is
copied byte for byte; config.json loses its quantization_config; side files are copied. The layout is
decided from headers alone, like `qstream quantize`'s plan, before any data moves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qstream.common import CHUNK_ELEMENTS, EVAL_NAME, REPORT_NAME, row_chunks
from qstream.errors import QstreamError
from qstream.format.formats import BF16_FORMAT, GROUP_FORMATS, MXFP4_FORMAT, PACKED, SCALE
from qstream.format.mxfp4 import BLOCK, dequantize
from qstream.io.checkpoint import CONFIG_NAME, Checkpoint, SourceTensor, open_checkpoint
from qstream.io.safetensors_io import OutEntry, read_rows
from qstream.io.shards import shard_file, write_index
from qstream.io.source_formats import DecodedTensor, decode_kept
from qstream.io.staging import copy_side_files, staging, write_json
from qstream.planning.plan import CopyJob, Shard, pack_shards

READ_FORMATS = set(GROUP_FORMATS.values())  # MXFP4 with FP8/MXFP8 kept beside it
DENSE_DTYPE = BF16_FORMAT.weight_dtypes[0]
NOT_CARRIED = frozenset({REPORT_NAME, EVAL_NAME})  # measurements of the quantized checkpoint, not of its decoding


class _Dense:
    """A module decoded into its dense `<module>.weight` in row chunks; subclasses decode rows."""

    module: str

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def entries(self) -> tuple[OutEntry, ...]:
        return (OutEntry(f"{self.module}.weight", DENSE_DTYPE, self.shape),)

    def slices(self, dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, dense rows) in chunks of about CHUNK_ELEMENTS, the weight seen as [rows, in]."""
        for r0, r1 in row_chunks(self.rows, self.in_features, CHUNK_ELEMENTS):
            yield r0, self._rows(r0, r1, dtype)

    def dense(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The whole decoded weight, filled chunk by chunk (peak: the result plus one chunk)."""
        out = torch.empty(self.rows, self.in_features, dtype=dtype)
        for r0, rows in self.slices(dtype):
            out[r0:r0 + rows.shape[0]] = rows
        return out.reshape(self.shape)


@dataclass(frozen=True)
class DequantJob(_Dense):
    """One MXFP4 module decoded into its dense `<module>.weight` (exact in bf16)."""

    module: str
    packed: SourceTensor
    scale: SourceTensor

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.info.shape[:-1], MXFP4_FORMAT.in_features(self.packed.info.shape[-1]))

    @property
    def bytes_in(self) -> int:
        return self.packed.info.nbytes + self.scale.info.nbytes

    def _rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        packed = read_rows(self.packed.file, self.packed.info, r0, r1)
        return dequantize(packed, read_rows(self.scale.file, self.scale.info, r0, r1), dtype)


@dataclass(frozen=True)
class KeptJob(_Dense):
    """An FP8/MXFP8 module kept beside MXFP4 ones, decoded as an FP8 input is (rounded once to bf16)."""

    module: str
    weight: DecodedTensor

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.info.shape

    @property
    def bytes_in(self) -> int:
        return sum(s.info.nbytes for s in self.weight.stored)

    def _rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.read_rows(r0, r1).to(dtype)


def _group_formats(qc: dict) -> set[str]:
    """The compressed-tensors formats of a quantization_config's groups (a group without one: the top-level)."""
    groups = qc.get("config_groups") or {}
    return {str(g.get("format") or qc.get("format")) for g in groups.values() if isinstance(g, dict)}


def is_mxfp4_checkpoint(ckpt: Checkpoint) -> bool:
    """compressed-tensors with an MXFP4 group (alone or beside kept FP8/MXFP8): what `dense_jobs` reads."""
    qc = ckpt.config.get("quantization_config")
    return (isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"
            and MXFP4_FORMAT.ct_format in _group_formats(qc))


def mxfp4_quantization_config(ckpt: Checkpoint) -> dict:
    """The checkpoint's quantization_config if it is compressed-tensors mxfp4-pack-quantized, else an error."""
    path = ckpt.root / CONFIG_NAME
    qc = ckpt.config.get("quantization_config")
    if not isinstance(qc, dict):
        raise QstreamError(f"{path}: no quantization_config, so not an MXFP4 checkpoint; nothing to dequantize")
    formats = _group_formats(qc)
    if not is_mxfp4_checkpoint(ckpt) or not formats <= READ_FORMATS:
        found = f"{qc.get('quant_method')}/{'+'.join(sorted(map(str, formats))) or qc.get('format')}"
        raise QstreamError(f"{path}: quantization_config is {found}, not compressed-tensors {MXFP4_FORMAT.ct_format}; "
                           "qstream reads back only MXFP4 checkpoints (as `qstream quantize` writes them)")
    return qc


def dense_config(config: dict) -> dict:
    """config.json of the dense checkpoint: the same keys in the same order, no quantization_config."""
    return {k: v for k, v in config.items() if k != "quantization_config"}


def _check_pair(packed: SourceTensor, scale: SourceTensor | None) -> SourceTensor:
    """The scale of an MXFP4 pair, once both fit the format; else the error naming them."""
    p = packed.info
    if scale is None:
        raise QstreamError(f"{p.name}: has no {p.name.removesuffix(PACKED) + SCALE} beside it; "
                           "the checkpoint is incomplete: re-create it with `qstream quantize`")
    s = scale.info
    f = MXFP4_FORMAT
    if p.dtype not in f.weight_dtypes or s.dtype not in f.scale_dtypes or not p.shape \
            or not f.scale_fits((*p.shape[:-1], f.in_features(p.shape[-1])), s.shape):
        raise QstreamError(f"{p.name} {p.dtype}{list(p.shape)} and {s.name} {s.dtype}{list(s.shape)}: "
                           f"not an MXFP4 pair (uint8 [..., in/2] and [..., in/{BLOCK}]); the checkpoint is corrupt")
    return scale


DenseJob = DequantJob | KeptJob | CopyJob


def dense_jobs(ckpt: Checkpoint[SourceTensor]) -> list[DenseJob]:
    """Every output tensor in source order: packed/scale pairs and kept FP8 weights decoded where they were."""
    kept, consumed = decode_kept(ckpt, mxfp4_quantization_config(ckpt))
    jobs: list[DenseJob] = []
    for name, t in ckpt.tensors.items():
        if name in kept:
            jobs.append(KeptJob(name.removesuffix(".weight"), kept[name]))
        elif name in consumed:
            continue
        elif name.endswith(PACKED):
            module = name.removesuffix(PACKED)
            scale = _check_pair(t, ckpt.tensors.get(module + SCALE))
            if module + ".weight" in ckpt.tensors:
                raise QstreamError(f"{module}: has both .weight and {PACKED}; the checkpoint is corrupt")
            jobs.append(DequantJob(module, t, scale))
        elif name.endswith(SCALE):
            if name.removesuffix(SCALE) + PACKED not in ckpt.tensors:
                raise QstreamError(f"{name}: has no {PACKED} beside it; the checkpoint is incomplete")
        else:
            jobs.append(CopyJob(t))
    if not any(isinstance(j, DequantJob) for j in jobs):
        raise QstreamError(f"{ckpt.root}: config says MXFP4 but no tensor ends in {PACKED}; the checkpoint is corrupt")
    return jobs


def _write_shard(shard: Shard[DenseJob], tmp: Path, advance: Callable[[int], None]) -> None:
    with shard_file(tmp, shard.file_name, shard.entries) as writer:
        for job in shard.jobs:
            if isinstance(job, CopyJob):
                writer.copy_from(job.source.name, job.source.file, job.source.info)
            else:
                (entry,) = job.entries
                for r0, rows in job.slices():
                    writer.write(entry.name, rows, r0 * entry.row_nbytes)
            advance(job.bytes_in)


def dequantize_checkpoint(src: Path, dst: Path, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
                          progress: bool = True) -> dict:
    """Write DST: the MXFP4 checkpoint SRC with every MXFP4 module decoded to bf16. Returns a summary."""
    t0 = time.perf_counter()
    ckpt = open_checkpoint(Path(src))
    jobs = dense_jobs(ckpt)
    shards = pack_shards(jobs, max_shard_bytes)
    bytes_in = sum(j.bytes_in for j in jobs)
    with staging(ckpt.root, Path(dst), overwrite, "qstream dequantize") as tmp:
        with tqdm(total=bytes_in, unit="B", unit_scale=True, unit_divisor=1024, desc="dequantize",
                  disable=not progress, dynamic_ncols=True) as bar:
            for shard in shards:
                _write_shard(shard, tmp, bar.update)
        write_index(tmp, [(s.file_name, s.entries) for s in shards])
        write_json(tmp / CONFIG_NAME, dense_config(ckpt.config))
        copy_side_files(ckpt.root, tmp, NOT_CARRIED)
    return {
        "source": str(ckpt.root),
        "modules_dequantized": sum(isinstance(j, DequantJob) for j in jobs),
        "modules_decoded_from_fp8": sum(isinstance(j, KeptJob) for j in jobs),
        "tensors_copied": sum(isinstance(j, CopyJob) for j in jobs),
        "bytes_in": bytes_in,
        "bytes_out": sum(s.nbytes for s in shards),
        "shards": len(shards),
        "seconds": time.perf_counter() - t0,
    }
