"""qstream.format.formats and format.rules: the two tables every path reads, checked against their readers."""

from __future__ import annotations

import pytest
import torch

from qstream.format.formats import (
    BF16_FORMAT,
    FP8,
    FP8_BLOCK,
    FP8_CHANNEL,
    FP8_TENSOR,
    MXFP4,
    MXFP4_FORMAT,
    MXFP8,
    MXFP8_FORMAT,
    STORAGE_FORMATS,
    kept_kind,
    scale_fits_kind,
    scheme_format,
)
from qstream.format.kernels import cpu
from qstream.format.mxfp4 import quantize
from qstream.format.rules import RULES, Rule, c_defines


@pytest.mark.parametrize("fmt", STORAGE_FORMATS, ids=lambda f: f.name)
def test_each_group_reads_back_as_its_kind(fmt) -> None:
    """A config group made from a row is read as that row's kind, by qstream and by compressed-tensors."""
    assert scheme_format({"weights": fmt.weights}) == fmt.kind
    if fmt.ct_format:
        from compressed_tensors.quantization import QuantizationScheme

        weights = {**fmt.weights, **({"block_structure": [32, 32]} if fmt is FP8_BLOCK else {})}
        QuantizationScheme.model_validate({"targets": ["Linear"], "weights": weights})


def test_scale_shape_rules() -> None:
    w = (64, 128)
    assert MXFP4_FORMAT.scale_fits(w, (64, 4)) and not MXFP4_FORMAT.scale_fits(w, (64, 3))
    assert not MXFP4_FORMAT.scale_fits((64, 80), (64, 2))  # 80 columns make no 32-blocks
    assert MXFP8_FORMAT.scale_fits(w, (64, 4))
    assert FP8_TENSOR.scale_fits(w, ()) and FP8_TENSOR.scale_fits(w, (1,)) and not FP8_TENSOR.scale_fits(w, (64,))
    assert FP8_CHANNEL.scale_fits(w, (64, 1))
    assert FP8_BLOCK.scale_fits(w, (2, 4)) and not FP8_BLOCK.scale_fits(w, (65, 4))
    assert scale_fits_kind(FP8, w, (1,)) and scale_fits_kind(FP8, w, (2, 1)) and not scale_fits_kind(MXFP8, w, (2, 1))
    assert not BF16_FORMAT.scale_fits(w, (1,))
    assert (kept_kind("U8"), kept_kind("BF16"), kept_kind(None)) == (MXFP8, FP8, FP8)


def test_stored_width_is_what_the_quantizer_writes() -> None:
    q = quantize(torch.randn(4, 96))
    assert q.packed.shape[-1] == MXFP4_FORMAT.stored_width(96) and MXFP4_FORMAT.in_features(q.packed.shape[-1]) == 96
    assert (MXFP8_FORMAT.stored_width(96), BF16_FORMAT.stored_width(96)) == (96, 96)
    assert scheme_format({"weights": MXFP4_FORMAT.weights}) == MXFP4


def test_rule_table_reaches_every_path() -> None:
    assert [s.code for s in RULES.values()] == sorted({s.code for s in RULES.values()})  # distinct codes
    assert RULES[Rule.MSE3].searched == (0, 1) and set(RULES[Rule.MSE3].searched) < set(RULES[Rule.MSE3].candidates)
    assert all(f"-DRULE_{r.name}={s.code}" in c_defines() for r, s in RULES.items())
    assert set(c_defines()) <= set(cpu.FLAGS)
    assert Rule.MSE3.doc == RULES[Rule.MSE3].doc and all(r.doc for r in Rule)
