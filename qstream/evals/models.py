"""Load checkpoints whole into transformers models; quantized weights are decoded by qstream as they load.

A plain checkpoint (and gpt-oss, whose MXFP4 transformers reads itself) loads with
`AutoModelForCausalLM.from_pretrained`. An MXFP4 checkpoint (compressed-tensors mxfp4-pack-quantized, with or
without kept FP8 weights) and an FP8/MXFP8 input load through the same transformers loader with the lazy state
dict the streaming engine builds its parts from (qstream.engine.weights), so the whole model and the engine
see the same decoded weights. eval itself runs on the engine; the whole model is the reference its tests and
benchmarks compare it with.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qstream.engine.weights import causal_lm_class, lazy_state_dict
from qstream.errors import QstreamError
from qstream.io.checkpoint import Checkpoint, open_checkpoint
from qstream.io.source_formats import quantization_config_of


def check_loaded(path: Path, info: dict) -> None:
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = f"missing {missing[:3]}" if missing else f"shape mismatch {mismatched[:3]}"
        raise QstreamError(f"{path}: weights do not fit the model its config.json describes ({what}); "
                           "is the checkpoint complete?")


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
