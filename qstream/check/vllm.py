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

import os
import tempfile
import time
from pathlib import Path

import torch

from qstream.check.vllm_hooks import NoKernel, Vllm, headers_only, import_vllm, kernel_probe, one_line
from qstream.check.vllm_report import ModuleRow, VllmReport
from qstream.check.vllm_writes import LoadState, Write, WriteTracker, coverage, describe
from qstream.common import peak_rss_bytes
from qstream.errors import QstreamError
from qstream.format.formats import (
    BF16,
    FP8,
    FP8_DTYPES,
    MXFP4,
    MXFP4_FORMAT,
    MXFP8,
    MXFP8_FORMAT,
    PACKED,
    SCALE,
    kept_kind,
)
from qstream.io.checkpoint import require_dir
from qstream.io.safetensors_io import DTYPES, read_header

FP8_TORCH = tuple(DTYPES[n][0] for n in FP8_DTYPES)
MTP_CONFIG_KEYS = ("mtp_num_hidden_layers", "num_nextn_predict_layers")


def check_with_vllm(dst: Path) -> VllmReport:
    """Build DST's model with vLLM on the meta device and run vLLM's loaders over its headers.

    Leaves a one-process torch.distributed group (gloo) initialised in the calling process, as vLLM's
    parallel layers need one; repeated calls reuse it.
    """
    dst = Path(dst)
    v = import_vllm()
    started = time.perf_counter()
    shapes = _checkpoint_shapes(dst)
    report = VllmReport(dst, v.vllm.__version__, str(v.current_platform.device_type), tensors=len(shapes))
    state = LoadState()
    with headers_only(v, shapes, state), kernel_probe(report):
        for model_config, cfg in _engine_configs(v, dst, report):
            with v.set_current_vllm_config(cfg):
                _init_distributed(v)
                _judge_model(v, cfg, model_config, shapes, state, report)
    if not report.errors:
        report.unconsumed = sorted(set(shapes) - state.consumed)
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def _checkpoint_shapes(dst: Path) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """name -> (dtype, shape, file) over every *.safetensors file: the tensors a loader may be offered."""
    require_dir(dst)
    files = sorted(dst.glob("*.safetensors"))
    if not files:
        raise QstreamError(f"{dst}: no *.safetensors files; is this a Hugging Face checkpoint?")
    return {n: (i.dtype, i.shape, f) for f in files for n, i in read_header(f).tensors.items()}


def _engine_configs(v: Vllm, dst: Path, report: VllmReport) -> list:
    """(model_config, VllmConfig) per model vLLM builds: the model, and its MTP drafter if it has one."""
    args = dict(model=str(dst), skip_tokenizer_init=True, max_model_len=256, enforce_eager=True,
                load_format="safetensors")
    try:
        cfg = v.EngineArgs(**args).create_engine_config()
    except Exception as exc:  # noqa: BLE001 - any vLLM failure here is its verdict
        report.errors.append(f"{dst / 'config.json'}: vLLM rejects the config: {one_line(exc)}")
        return []
    configs = [(cfg.model_config, cfg)]
    text = cfg.model_config.hf_text_config
    if any(getattr(text, k, 0) for k in MTP_CONFIG_KEYS):
        try:
            spec = v.EngineArgs(**args, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
            spec_cfg = spec.create_engine_config()
            configs.append((spec_cfg.speculative_config.draft_model_config, spec_cfg))
        except Exception as exc:  # noqa: BLE001
            report.errors.append(f"{dst}: the config declares an MTP head that vLLM cannot build: {one_line(exc)}")
    return configs


def _init_distributed(v: Vllm) -> None:
    """vLLM's parallel layers need a (one-process) process group; set it up once per process."""
    if torch.distributed.is_initialized():
        return
    init_file = Path(tempfile.gettempdir()) / f"qstream-vllm-{os.getpid()}-{time.time_ns()}"
    v.init_distributed_environment(1, 0, f"file://{init_file}", 0, "gloo")
    v.ensure_model_parallel_initialized(1, 1)


def _judge_model(v: Vllm, cfg, model_config, shapes, state: LoadState, report: VllmReport) -> None:
    """Build one model on meta, load the headers into it with vLLM's loader, and report what happened."""
    arch = model_config.architectures[0] if model_config.architectures else "?"
    prefix = f"({arch}) " if report.models else ""  # a drafter's module names repeat the main model's
    try:
        with v.set_default_torch_dtype(model_config.dtype), torch.device("meta"):
            model = v.initialize_model(vllm_config=cfg, model_config=model_config)
    except Exception as exc:  # noqa: BLE001
        report.errors.append(f"{arch}: vLLM cannot build the model: {one_line(exc)}")
        return
    report.models.append(type(model).__name__)
    tracker = WriteTracker(model, state)
    modules = _modules(v, model)
    try:
        with tracker:
            v.get_model_loader(cfg.load_config).load_weights(model, model_config)
    except Exception as exc:  # noqa: BLE001
        report.errors.append(f"{arch}: vLLM's loader raised while loading {state.last}: {one_line(exc)}")
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


def _coverage_findings(v: Vllm, model, modules, writes, prefix: str, report: VllmReport) -> None:
    """Every parameter region nothing wrote, or something wrote twice."""
    exempt = _not_from_checkpoint(v, model)
    for name, param in model.named_parameters():
        if name in exempt:
            continue
        gaps, twice = coverage(param, writes.get(name, []))
        module = modules.get(name.rpartition(".")[0])
        report.unwritten += [prefix + u for u in describe(name, param, module, model, gaps)]
        report.overwritten += [f"{prefix}{name}: {t}" for t in twice]


def _not_from_checkpoint(v: Vllm, model: torch.nn.Module) -> set[str]:
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


def _modules(v: Vllm, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    kinds = (v.LinearBase, v.RoutedExperts, v.VocabParallelEmbedding)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def _module_row(label: str, m, shapes, writes: dict[str, list[Write]], canonical: dict[int, str]) -> ModuleRow | None:
    own = [n for n, _ in m.named_parameters(recurse=False)]
    if not own:
        return None
    scheme = getattr(m, "scheme", None)
    method = scheme or getattr(m, "quant_method", None)
    kernel = getattr(scheme, "kernel", None) or getattr(method, "experts_cls", None)
    kernel_name = (
        "" if kernel is None else "none on this machine" if isinstance(kernel, NoKernel)
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
    if any(n.endswith(PACKED[1:]) for n in params):  # vLLM's parameter names lack the module's dot
        return MXFP4
    if any(n.endswith("weight") and p.dtype in FP8_TORCH for n, p in params.items()):
        e8m0 = tuple(DTYPES[n][0] for n in MXFP8_FORMAT.scale_dtypes)
        e8m0_scales = any(n.endswith(SCALE[1:]) and p.dtype in e8m0 for n, p in params.items())
        return MXFP8 if e8m0_scales else FP8
    return BF16


def _format(tensor: str, shapes) -> str:
    """What a checkpoint tensor says about its module: MXFP4 (packed or scale, U8), FP8 or MXFP8 (an FP8
    weight and what travels with it, told apart by the scale's dtype), or its float dtype."""
    base, dtype = tensor.rpartition(".")[0], shapes[tensor][0]
    if shapes.get(f"{base}.weight", ("",))[0] in FP8_DTYPES:
        return kept_kind(shapes.get(base + SCALE, (None,))[0])
    if tensor.endswith((PACKED, SCALE)):
        return MXFP4 if dtype in MXFP4_FORMAT.weight_dtypes else f"MXFP4 stored as {dtype}"
    return dtype
