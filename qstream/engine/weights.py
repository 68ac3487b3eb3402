"""Checkpoint weights as transformers asks for them, read and decoded by qstream: the engine builds its parts
from them, and eval's whole-model loader (qstream.evals.models) too.

`lazy_state_dict` offers every weight under the name transformers expects: each `<m>.weight_packed`/
`weight_scale` pair, or FP8 weight and scale, as `<m>.weight`, decoded only when transformers materializes that
one tensor (as it materializes safetensors slices), so a model is built from qstream's own decoding, never from
compressed-tensors', with no dense copy on disk and never two copies in memory. transformers' own key mapping
(fused experts, prefixes) applies exactly as for a plain checkpoint, so an FP8 source and its MXFP4 output run
on equal terms. Every tensor is read into fresh memory, never mapped, so a freed part leaves nothing resident.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from qstream.convert.dequantize import dense_jobs, is_mxfp4_checkpoint
from qstream.errors import QstreamError
from qstream.format.mxfp4 import dequantize
from qstream.io.checkpoint import Checkpoint, SourceTensor
from qstream.io.source_formats import DecodedTensor, PackedExperts, decode_checkpoint
from qstream.planning.plan import CopyJob


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
