"""Load checkpoints into transformers models for eval; quantized weights are decoded by qstream as they load.

A plain checkpoint (and gpt-oss, whose MXFP4 transformers reads itself) loads with
`AutoModelForCausalLM.from_pretrained`. An MXFP4 checkpoint (compressed-tensors mxfp4-pack-quantized, with or
without kept FP8 weights) and an FP8/MXFP8 input load through the same transformers loader with a lazy state
dict: each `<m>.weight_packed`/`weight_scale` pair, or FP8 weight and scale, is offered as `<m>.weight` and
decoded by qstream only when transformers materializes that one tensor (as it materializes safetensors
slices), so the model is built from our own decoding, never from compressed-tensors', with no dense copy on
disk and never two copies in memory. transformers' own key mapping (fused experts, prefixes) applies
exactly as for a plain checkpoint, so an FP8 source and its MXFP4 output are scored on equal terms.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path

import torch

from qstream.convert.dequantize import dense_jobs, is_mxfp4_checkpoint
from qstream.errors import QstreamError
from qstream.io.checkpoint import Checkpoint, open_checkpoint
from qstream.io.source_formats import DecodedTensor, decode_checkpoint, quantization_config_of
from qstream.planning.plan import CopyJob


class _DecodedOnLoad:
    """Stands in for a safetensors slice: `x[...]` returns the dense weight, decoded then."""

    def __init__(self, name: str, decode: Callable[[], torch.Tensor]) -> None:
        self.name, self.decode = name, decode

    def __getitem__(self, index: object) -> torch.Tensor:
        if index is not Ellipsis:
            raise TypeError(f"{self.name}: only [...] is supported, got {index!r}")
        return self.decode()


def _lazy_weights(ckpt: Checkpoint, files: dict) -> dict[str, object]:
    """name -> a safetensors slice, or a weight decoded by qstream when transformers asks for it: MXFP4
    modules and kept FP8 weights of a qstream output, or the FP8/MXFP8 weights of a quantized input."""
    if is_mxfp4_checkpoint(ckpt):
        state: dict[str, object] = {}
        for job in dense_jobs(ckpt):
            if isinstance(job, CopyJob):
                state[job.source.name] = files[job.source.file].get_slice(job.source.name)
            else:
                state[job.entries[0].name] = _DecodedOnLoad(job.module, functools.partial(job.dense, torch.bfloat16))
        return state
    return {name: _DecodedOnLoad(name, functools.partial(t.read_rows, 0, t.info.shape[0]))
            if isinstance(t, DecodedTensor) else files[t.file].get_slice(name)
            for name, t in decode_checkpoint(ckpt).tensors.items()}


def _check_loaded(path: Path, info: dict) -> None:
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = f"missing {missing[:3]}" if missing else f"shape mismatch {mismatched[:3]}"
        raise QstreamError(f"{path}: weights do not fit the model its config.json describes ({what}); "
                           "is the checkpoint complete?")


def _load_decoded(ckpt: Checkpoint, dtype: torch.dtype):
    from safetensors import safe_open
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    path = ckpt.root
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # the weights handed over are dense
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_cls is None:
        raise QstreamError(f"{path}: transformers has no causal LM for model_type {config.model_type!r}")
    if config.sub_configs.get("text_config") is model_cls.config_class:  # as AutoModelForCausalLM does
        config = config.get_text_config()
    with contextlib.ExitStack() as stack:
        files = {f: stack.enter_context(safe_open(str(f), "pt")) for f in ckpt.weight_files}
        state = _lazy_weights(ckpt, files)  # validates every packed/scale pair and FP8 scale first
        model, info = model_cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                output_loading_info=True)
    return model, info


def load_model(path: Path, dtype: torch.dtype, device: torch.device):
    """A causal LM in eval mode on `device`: plain checkpoints as transformers loads them, MXFP4 decoded by qstream."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load would drown eval's own
    ckpt = open_checkpoint(Path(path))
    qcfg = quantization_config_of(ckpt.config)
    if qcfg is not None and qcfg.get("quant_method") != "mxfp4":  # gpt-oss's own MXFP4: transformers reads it
        model, info = _load_decoded(ckpt, dtype)
    else:
        model, info = AutoModelForCausalLM.from_pretrained(ckpt.root, dtype=dtype, output_loading_info=True)
    _check_loaded(ckpt.root, info)
    return model.to(device).eval()
