"""Fast MXFP4 quantizers behind one call: Triton on CUDA, the C kernel on CPU, torch everywhere else.

Every backend writes the bytes of `qstream.format.mxfp4_ref.quantize_ref` (tests hold them to it bit for bit),
so the choice changes speed only, never the output.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from qstream.format.mxfp4 import Quantized, quantize
from qstream.format.rules import Rule


@functools.cache
def _cpu_kernel():
    """The C kernel module once it builds and loads, else None (warned about once)."""
    from qstream.format.kernels import cpu

    try:
        cpu.library()
    except (cpu.BuildError, OSError) as exc:
        warnings.warn(f"qstream: C MXFP4 kernel unavailable ({exc}); using the slower torch path", stacklevel=3)
        return None
    return cpu


@functools.cache
def _triton_kernel():
    from qstream.format.kernels import triton_mxfp4

    return triton_mxfp4 if triton_mxfp4.available() else None


# device type -> (backend name, loader returning its module or None)
_BACKENDS = {"cuda": ("triton", _triton_kernel), "cpu": ("c", _cpu_kernel)}


def _backend(device: torch.device) -> tuple[str, Callable[[torch.Tensor, Rule], Quantized]]:
    name, load = _BACKENDS.get(device.type, ("torch", lambda: None))
    mod = load()
    return (name, mod.quantize) if mod else ("torch", quantize)


def backend_name(device: torch.device | str) -> str:
    """'triton', 'c' or 'torch': what `quantize_fast` uses for tensors on `device`."""
    return _backend(torch.device(device))[0]


def quantize_fast(w: torch.Tensor, rule: Rule = Rule.MSE3) -> Quantized:
    """`qstream.format.mxfp4.quantize` with the fastest backend for w's device; same bytes, same statistics."""
    return _backend(w.device)[1](w, rule)
