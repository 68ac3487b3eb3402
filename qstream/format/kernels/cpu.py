"""The C MXFP4 kernel (mxfp4_cpu.c): compiled with the system C compiler on first use, loaded with ctypes.

No Python C API and no torch headers, so a build takes about a second. The shared object is cached
under `cache_dir()/kernels`, named by a hash of the source, the flags and the compiler's version, and
written to a temporary name then renamed, so concurrent first uses are safe. The flags name no
machine-specific target: the generic one computes the same IEEE results everywhere, which keeps the
output bytes identical across machines. ctypes releases the GIL during the call, so I/O threads run on.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from qstream.common import cache_dir
from qstream.format.mxfp4 import BLOCK, NonFiniteError, Quantized, check_shape
from qstream.format.rules import Rule, c_defines

SOURCE = Path(__file__).with_name("mxfp4_cpu.c")
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", *c_defines())
DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


class BuildError(RuntimeError):
    """The C compiler is missing or failed; the caller falls back to the torch path."""


def compiler() -> str:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc:
        raise BuildError("no C compiler found (set CC or install gcc)")
    return cc


def library_path(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, platform.machine()]).encode())
    return cache_dir() / "kernels" / f"mxfp4_cpu-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the kernel unless a build for this source and compiler is cached; returns the .so path."""
    cc = compiler()
    out = library_path(cc)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".so.tmp", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, check=False)
        if proc.returncode:
            raise BuildError(f"{cc} failed on {SOURCE.name}: {proc.stderr.strip()[:500]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    fn = lib.qstream_mxfp4_quantize
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def quantize(w: torch.Tensor, rule: Rule = Rule.MSE3, threads: int | None = None) -> Quantized:
    """Same contract and bytes as `qstream.format.mxfp4.quantize`, for CPU tensors; raises BuildError if no compiler."""
    check_shape(tuple(w.shape))
    if w.dtype not in DTYPE_CODES:
        w = w.float()
    w = w.contiguous()
    lead, n = tuple(w.shape[:-1]), w.shape[-1]
    packed = torch.empty(*lead, n // 2, dtype=torch.uint8)
    scales = torch.empty(*lead, n // BLOCK, dtype=torch.uint8)
    stats = torch.zeros(2, dtype=torch.float64)
    counts = torch.zeros(3, dtype=torch.int64)
    bad = library().qstream_mxfp4_quantize(
        w.data_ptr(), DTYPE_CODES[w.dtype], w.numel() // BLOCK, rule.spec.code, threads or torch.get_num_threads(),
        packed.data_ptr(), scales.data_ptr(), stats.data_ptr(), counts.data_ptr())
    if bad:
        raise NonFiniteError(f"{bad} NaN or Inf value(s)")  # as mxfp4.quantize says it
    return Quantized(packed, scales, float(stats[0]), float(stats[1]), (int(counts[0]), int(counts[1]), int(counts[2])))
