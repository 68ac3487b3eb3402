"""Fast MXFP4 quantizers behind one call: Triton on CUDA, the C kernel on CPU, torch everywhere else.

Every backend writes the bytes of `qstream.format.mxfp4_ref.quantize_ref` (tests hold them to it bit for bit),
so the choice changes speed only, never the output.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future

import torch

from qstream.format.mxfp4 import BLOCK, Quantized, quantize
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


_warm_ups: dict[str, Future] = {}  # device type -> its warm-up, done or under way
WARM_ROWS = 16  # rows of the warm-up tensor: 16 blocks, so Triton specializes it as it does real chunks


def warm_up(device: torch.device | str, rule: Rule = Rule.MSE3) -> None:
    """Start `device`'s fast backend on a thread of its own: the CUDA context, Triton's import and the compile
    (or cache load) of `rule`'s kernel for BF16 (what checkpoints hold) take seconds, which the caller's planning
    and first reads can hide (on CPU: building or loading the C kernel). `quantize_fast` on that device waits for
    it, so no two threads load a backend at once. Its errors are dropped: the first real call meets them itself,
    with its own message. A device warmed (or warming) already is left alone."""
    dev = torch.device(device)
    if dev.type in _warm_ups:
        return
    done: Future = Future()
    _warm_ups[dev.type] = done

    def warm() -> None:
        try:
            with contextlib.suppress(Exception):  # see the docstring
                _backend(dev)[1](torch.zeros(WARM_ROWS, BLOCK, dtype=torch.bfloat16, device=dev), rule)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
        finally:
            done.set_result(None)

    # not a daemon: a process that fails early waits for it rather than tearing torch down under it (SIGABRT)
    threading.Thread(target=warm, name="qstream-warm-up").start()


def quantize_fast(w: torch.Tensor, rule: Rule = Rule.MSE3) -> Quantized:
    """`qstream.format.mxfp4.quantize` with the fastest backend for w's device; same bytes, same statistics."""
    warming = _warm_ups.get(w.device.type)
    if warming is not None:
        warming.result()
    return _backend(w.device)[1](w, rule)
