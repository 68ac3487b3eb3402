"""Load checkpoints into transformers models for eval; quantized weights are decoded by qstream as they load.

A plain checkpoint (and gpt-oss, whose MXFP4 transformers reads itself) loads with
`AutoModelForCausalLM.from_pretrained`. An MXFP4 checkpoint (compressed-tensors mxfp4-pack-quantized, with or
without kept FP8 weights) and an FP8/MXFP8 input load through the same transformers loader with a lazy state
dict: each `<m>.weight_packed`/`weight_scale` pair, or FP8 weight and scale, is offered as `<m>.weight` and
decoded by qstream only when transformers materializes that one tensor (as it materializes safetensors
slices), so the model is built from our own decoding, never from compressed-tensors', with no dense copy on
disk and never two copies in memory. transformers' own key mapping (fused experts, prefixes) applies
exactly as for a plain checkpoint, so an FP8 source and its MXFP4 output are scored on equal terms. The
streaming engine (qstream.engine) builds its parts from the same lazy state dict, a few tensors at a time;
every tensor is read into fresh memory, never mapped, so a freed part leaves nothing resident.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch

from qstream.checkpoint import Checkpoint, SourceTensor, open_checkpoint
from qstream.dequantize import dense_jobs, is_mxfp4_checkpoint
from qstream.errors import QstreamError
from qstream.plan import CopyJob
from qstream.mxfp4 import dequantize
from qstream.source_formats import DecodedTensor, PackedExperts, decode_checkpoint, quantization_config_of


class _DecodedOnLoad:
    """Stands in for a safetensors slice: `x[...]` returns the dense weight, decoded then."""

    def __init__(self, name: str, decode: Callable[[], torch.Tensor]) -> None:
        self.name, self.decode = name, decode

    def __getitem__(self, index: object) -> torch.Tensor:
        if index is not Ellipsis:
            raise TypeError(f"{self.name}: only [...] is supported, got {index!r}")
        return self.decode()


def _gpt_oss_dense(t: PackedExperts, dtype: torch.dtype) -> torch.Tensor:
    """gpt-oss fused MXFP4 experts [E, out, in] decoded into the layout of its dense checkpoints, [E, in, out]."""
    e, rows, n = t.info.shape
    packed, scales = t.read_packed(0, e * rows, 1)
    return dequantize(packed, scales, dtype).reshape(e, rows, n).transpose(1, 2)


def read_stored(t: SourceTensor) -> torch.Tensor:
    """A tensor as stored, read into fresh memory (not a view of a mapped file: freeing it frees the memory)."""
    shape = t.info.shape
    return t.read_rows(0, math.prod(shape[:-1]) if shape else 1).reshape(shape)


def lazy_state_dict(ckpt: Checkpoint, read: Callable[[SourceTensor], torch.Tensor] = read_stored
                    ) -> dict[str, object]:
    """name -> a tensor read (and decoded) by qstream when transformers asks for it: as stored (by `read`), or
    the MXFP4 modules and kept FP8 weights of a qstream output, the FP8/MXFP8 weights of a quantized input, or
    gpt-oss's MXFP4 experts (as its dense checkpoints store them)."""
    def stored(t: SourceTensor) -> _DecodedOnLoad:
        return _DecodedOnLoad(t.name, functools.partial(read, t))

    if is_mxfp4_checkpoint(ckpt):
        state: dict[str, object] = {}
        for job in dense_jobs(ckpt):
            if isinstance(job, CopyJob):
                state[job.source.name] = stored(job.source)  # type: ignore[arg-type]  # plain in an MXFP4 output
            else:
                state[job.entries[0].name] = _DecodedOnLoad(job.module, functools.partial(job.dense, torch.bfloat16))
        return state
    decoded = decode_checkpoint(ckpt).tensors
    if any(isinstance(t, PackedExperts) for t in decoded.values()):  # gpt-oss: biases stay fused as stored
        state = {n: stored(t) for n, t in ckpt.tensors.items() if not n.endswith(("_blocks", "_scales"))}
        state.update({n: _DecodedOnLoad(n, functools.partial(_gpt_oss_dense, t, torch.bfloat16))
                      for n, t in decoded.items() if isinstance(t, PackedExperts)})
        return state
    return {name: _DecodedOnLoad(name, functools.partial(t.read_rows, 0, t.info.shape[0]))
            if isinstance(t, DecodedTensor) else stored(t)  # type: ignore[arg-type]
            for name, t in decoded.items()}


def check_loaded(path: Path, info: dict) -> None:
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = f"missing {missing[:3]}" if missing else f"shape mismatch {mismatched[:3]}"
        raise QstreamError(f"{path}: weights do not fit the model its config.json describes ({what}); "
                           "is the checkpoint complete?")


def causal_lm_class(ckpt: Checkpoint, dense: bool = True):
    """(transformers causal-LM class, its config) for a checkpoint, as AutoModelForCausalLM picks them: the
    text model alone for a multimodal one. `dense`: the config loses its quantization_config, for weights
    handed over decoded."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    path = ckpt.root
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as exc:
        import transformers

        raise QstreamError(f"{path / 'config.json'}: transformers {transformers.__version__} cannot read it "
                           f"({str(exc).splitlines()[0]}); upgrade transformers or check model_type") from None
    if dense and hasattr(config, "quantization_config"):
        del config.quantization_config
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_cls is None:
        raise QstreamError(f"{path}: transformers has no causal LM for model_type {config.model_type!r}")
    if config.sub_configs.get("text_config") is model_cls.config_class:  # as AutoModelForCausalLM does
        config = config.get_text_config()
    return model_cls, config


def _load_decoded(ckpt: Checkpoint, dtype: torch.dtype):
    model_cls, config = causal_lm_class(ckpt)
    state = lazy_state_dict(ckpt)  # validates every packed/scale pair and FP8 scale first
    return model_cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)


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
    check_loaded(ckpt.root, info)
    return model.to(device).eval()
