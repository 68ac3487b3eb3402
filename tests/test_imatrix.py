"""Activation-weighted exponents: the candidate-set argument, fast == reference bit for bit, MSE3 under equal
weights, the `quantize --method imatrix` plumbing and the bound `verify` holds its outputs to."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from qstream.calib import imatrix
from qstream.calib.calibrate import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, STATS_NAME
from qstream.calib.imatrix import DEPTH, MAX_DEPTH, WEIGHT_BITS, block_weights, nearest_code_problems, quantize_weighted
from qstream.calib.imatrix_ref import (
    block_weights_ref,
    element_errors_ref,
    quantize_weighted_ref,
    weighted_exponent_ref,
)
from qstream.check.verify import verify
from qstream.cli import CALIB_SAMPLES, CALIB_SEQ_LEN, cli
from qstream.common import REPORT_NAME
from qstream.format.mxfp4 import dequantize, encode, pack_codes, quantize, to_blocks, unpack_codes
from qstream.format.mxfp4_ref import block_exponent_ref
from qstream.format.rules import Rule
from qstream.io.checkpoint import INDEX_NAME
from qstream.io.safetensors_io import read_header, read_rows
from qstream.io.staging import calib_dir_for, temp_dir_for
from qstream.report.card import write_card
from qstream.report.coverage import PLOT_HOWTO, PLOT_NAME, experts_layers
from tests.calib_stats import collect_stats
from tests.fixtures import assert_same_files, load_tensors
from tests.test_bad_input import assert_refused, tree_hashes
from tests.test_evaluate import PROSE, byte_tokenizer
from tests.test_mxfp4 import finite_blocks, special_tensor

# ------------------------------------------------------------------------------------------------ numerics


def test_block_weights_by_hand() -> None:
    a = torch.tensor([3.0, 1.5, 0.75, 0.0, 2.0**-20, 2.9999] + [1.0] * 26, dtype=torch.float64)
    k = block_weights(a)[0].tolist()  # the block max 3 < 2^2: k = floor(a * 2^(16 - 2))
    assert k[:6] == [3 * 2**14, 3 * 2**13, 3 * 2**12, 0, 0, math.floor(2.9999 * 2**14)]
    assert max(k) < 2**WEIGHT_BITS
    assert block_weights(torch.zeros(64, dtype=torch.float64)).eq(0).all()
    assert block_weights(a * 2.0**-1000).tolist() == block_weights(a).tolist()  # only ratios within a block matter
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="finite and non-negative"):
            block_weights(torch.tensor([bad] + [1.0] * 31, dtype=torch.float64))


def weight_patterns(n: int, seed: int) -> list[torch.Tensor]:
    """Channel weights as calibration gives them and at their extremes: wide log-uniform spread, zeros,
    all equal, all zero, one hot channel per block, a few massive channels."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.exp2(torch.empty(n, dtype=torch.float64).uniform_(-30, 10, generator=g))
    holes = spread * (torch.rand(n, generator=g) > 0.3)
    one_hot = torch.zeros(n, dtype=torch.float64)
    one_hot[torch.arange(0, n, 32) + torch.randint(0, 32, (n // 32,), generator=g)] = 1.0
    massive = torch.ones(n, dtype=torch.float64)
    massive[torch.randint(0, n, (3,), generator=g)] = 1e6
    return [spread, holes, torch.full((n,), 0.37, dtype=torch.float64), torch.zeros(n, dtype=torch.float64),
            one_hot, massive]


@pytest.mark.parametrize("depth", [1, DEPTH, MAX_DEPTH])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fast_equals_reference(dtype: torch.dtype, depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Zeros, +-0, ties, clipping, subnormal and huge blocks (special_tensor) under every weight pattern
    (half of them per case, in turn: the suite stays fast, the reference is exact rationals). Both ways the
    fast path decides: float64 sums with exact sums for near-ties, and exact sums for every block."""
    w = special_tensor(dtype, seed=depth)
    if dtype is torch.float16:
        w = torch.nan_to_num(w.float().clamp(-6e4, 6e4)).to(dtype)
    patterns = weight_patterns(w.shape[-1], seed=depth)
    for a in patterns[depth % 2::2]:
        packed, scales = quantize_weighted_ref(w, a, depth)
        for margin in (imatrix.SURE_MARGIN, math.inf):  # inf: no block is sure, all go the exact way
            with monkeypatch.context() as m:
                m.setattr(imatrix, "SURE_MARGIN", margin)
                q = quantize_weighted(w, a, depth)
            assert torch.equal(q.packed, packed) and torch.equal(q.scales, scales)


channel_weights = st.lists(
    st.one_of(st.just(0.0), st.floats(min_value=2.0**-60, max_value=2.0**60), st.integers(0, 3).map(float)),
    min_size=32, max_size=32).map(lambda v: torch.tensor(v, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(finite_blocks, channel_weights, st.integers(0, MAX_DEPTH))
def test_fast_equals_reference_property(w: torch.Tensor, a: torch.Tensor, depth: int) -> None:
    q = quantize_weighted(w, a, depth)
    packed, scales = quantize_weighted_ref(w, a, depth)
    assert torch.equal(q.packed, packed) and torch.equal(q.scales, scales)


@settings(max_examples=60, deadline=None)
@given(finite_blocks, st.sampled_from([0.0, 1e-30, 0.5, 3.0, 1e30]), st.integers(2, MAX_DEPTH))
def test_equal_weights_choose_mse3(w: torch.Tensor, c: float, depth: int) -> None:
    """Equal weights (all zero included) make the objective MSE3's: the same bytes at every depth >= 2."""
    q, m = quantize_weighted(w, torch.full((32,), c, dtype=torch.float64), depth), quantize(w, Rule.MSE3)
    assert torch.equal(q.packed, m.packed) and torch.equal(q.scales, m.scales)


def test_equal_weights_choose_mse3_on_special_blocks() -> None:
    for dtype in (torch.bfloat16, torch.float32):
        w = special_tensor(dtype, seed=11)
        for c in (0.0, 1.0):
            q, m = quantize_weighted(w, torch.full((128,), c, dtype=torch.float64), MAX_DEPTH), quantize(w)
            assert torch.equal(q.packed, m.packed) and torch.equal(q.scales, m.scales)


@settings(max_examples=60, deadline=None)
@given(finite_blocks)
def test_no_exponent_above_r_has_less_error_on_any_element(w: torch.Tensor) -> None:
    """The argument that the set stops at R: element by element, R+1..R+3 are never nearer than R, so no
    non-negative weighting of them can beat R."""
    block = w[0].float().tolist()
    r = block_exponent_ref(max(abs(x) for x in block), Rule.RCEIL)
    _, at_r = element_errors_ref(block, r)
    for above in (r + 1, r + 2, r + 3):
        _, errs = element_errors_ref(block, above)
        assert all(e >= e_r for e, e_r in zip(errs, at_r))


@pytest.mark.parametrize("k", range(MAX_DEPTH + 1))
def test_every_exponent_down_to_r_minus_depth_can_win(k: int) -> None:
    """The argument that how deep to search is a choice: all the weight on an element 1.5 * 2^(R-k) makes
    R-k the choice whenever the set reaches it; a shallower set stays inside itself."""
    block = [6.0, -5.0, 3.25] + [0.0] * 29  # R = 0
    block[7] = 1.5 * 2.0**-k
    w = torch.tensor([block], dtype=torch.float32)
    a = torch.zeros(32, dtype=torch.float64)
    a[7] = 1.0
    for depth in range(MAX_DEPTH + 1):
        want = -min(k, depth) if k <= depth else None
        got = int(quantize_weighted(w, a, depth).scales[0, 0]) - 127
        assert got == weighted_exponent_ref(block, block_weights_ref(a.tolist()), depth)[0]
        if want is not None:
            assert got == want
        else:
            assert -depth <= got <= 0


def test_exponent_extremes() -> None:
    """A block at the bottom of E8M0 has only R = E_MIN to choose; a huge one searches as usual."""
    tiny = torch.full((1, 32), 2.0**-140)  # R clamps at -127; R-1 does not exist
    a = torch.arange(32, dtype=torch.float64)
    assert int(quantize_weighted(tiny, a, MAX_DEPTH).scales[0, 0]) == 0
    huge = torch.tensor([[6.0 * 2**120, 1.5 * 2**118] + [0.0] * 30])
    a = torch.zeros(32, dtype=torch.float64)
    a[1] = 1.0
    assert int(quantize_weighted(huge, a, 2).scales[0, 0]) - 127 == 118


def test_leading_dims_and_per_row_weights() -> None:
    """Weights [in] broadcast over rows; weights of w's own shape (a fused [E, out, in] tensor with per-expert
    weights) give each row its own."""
    w = special_tensor(torch.bfloat16, 4)[5:].reshape(1, 19, 128)[:, :18].reshape(3, 6, 128)
    a = weight_patterns(128, 1)[0]
    per_row = torch.stack([a, a.flip(0), a.roll(7)])[:, None, :].expand(3, 6, 128)
    q = quantize_weighted(w, per_row, DEPTH)
    for e in range(3):
        qe = quantize_weighted(w[e], per_row[e, 0], DEPTH)
        assert torch.equal(q.packed[e], qe.packed) and torch.equal(q.scales[e], qe.scales)
    with pytest.raises(ValueError, match="do not fit"):
        quantize_weighted(w, a[:64], DEPTH)


def test_weighting_lowers_weighted_error() -> None:
    """Good, not just same: with skewed weights the weighted error drops below MSE3's, the plain error rises."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g).to(torch.bfloat16)
    a = torch.exp2(torch.randn(512, generator=g, dtype=torch.float64) * 3)

    def errors(packed: torch.Tensor, scales: torch.Tensor) -> tuple[float, float]:
        d2 = (dequantize(packed, scales, torch.float64) - w.double()) ** 2
        return float((d2 * a).sum()), float(d2.sum())

    qw, m = quantize_weighted(w, a, DEPTH), quantize(w)
    (ww, wu), (mw, mu) = errors(qw.packed, qw.scales), errors(m.packed, m.scales)
    assert ww < 0.97 * mw and wu > mu


def test_verify_bound_numerics() -> None:
    """Any output of the weighted choice passes; a flipped code or an exponent outside {R-depth..R} fails."""
    w = special_tensor(torch.bfloat16, 2)
    a = weight_patterns(128, 2)[1]
    q = quantize_weighted(w, a, DEPTH)
    bad_e, bad_c = nearest_code_problems(w, q.packed, q.scales, DEPTH)
    assert not bad_e.any() and not bad_c.any()
    m = quantize(w)  # MSE3 (the fallback) lies inside the set too
    assert not any(t.any() for t in nearest_code_problems(w, m.packed, m.scales, DEPTH))
    codes = unpack_codes(q.packed)
    codes[10, 40] ^= 0x1  # one element off its nearest value, in row 10 block 1
    bad_e, bad_c = nearest_code_problems(w, pack_codes(codes), q.scales, DEPTH)
    assert not bad_e.any() and bad_c.nonzero().tolist() == [[10, 1]]
    r = int(quantize(w, Rule.RCEIL).scales[12, 2]) - 127
    for outside in (r - DEPTH - 1, r + 1):  # below the set, above R; codes nearest under it: only E is wrong
        e = q.scales.to(torch.int32).reshape(-1, 4) - 127
        e[12, 2] = outside
        redone = encode(to_blocks(w), e, e, tuple(w.shape))
        bad_e, bad_c = nearest_code_problems(w, redone.packed, redone.scales, DEPTH)
        assert bad_e.nonzero().tolist() == [[12, 2]] and not bad_c.any()


# ------------------------------------------------------------------------------ quantize --method imatrix


def _stats(ckpt: Path, out: Path, seed: int = 0, **kw) -> Path:
    """Real statistics of the tiny model on random token windows, by the independent collector."""
    windows = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))
    return collect_stats(ckpt, windows, out, **kw)


def _quantize(src: Path, dst: Path, *args: object) -> Result:
    return CliRunner().invoke(cli, ["quantize", str(src), str(dst), "--no-progress", *map(str, args)])


def _edit_stats(stats: Path, fn) -> None:
    """Rewrite STATS' tensors through fn(dict) (tiny files only)."""
    path = stats / STATS_NAME
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def fused_stats(tiny_qwen3_moe_fused: Path, tmp_path_factory) -> Path:
    """Routed-token statistics of the fused-experts fixture, with one tensor's statistics removed and one
    expert given no tokens: both must fall back to mse3."""
    stats = _stats(tiny_qwen3_moe_fused, tmp_path_factory.mktemp("stats") / "s", all_experts=False)

    def edit(t: dict) -> None:
        for key in [k for k in t if k.startswith(FUSED_DOWN_1)]:
            del t[key]
        t[f"{FUSED_GATE_UP_0}:tokens"][3] = 0

    _edit_stats(stats, edit)
    return stats


FUSED_GATE_UP_0 = "model.layers.0.mlp.experts.gate_up_proj"
FUSED_DOWN_1 = "model.layers.1.mlp.experts.down_proj"


def test_fused_experts_read_their_rows(tiny_qwen3_moe_fused: Path, fused_stats: Path, tmp_path: Path) -> None:
    """Each expert of a fused [E, out, in] tensor gets its own row of statistics; fallbacks are mse3 and
    counted; the output passes verify's imatrix bound and states the rule in report and card."""
    dst = tmp_path / "out"
    res = _quantize(tiny_qwen3_moe_fused, dst, "--method", "imatrix", "--calib", fused_stats)
    assert res.exit_code == 0, res.output
    report = json.loads((dst / "qstream_report.json").read_text())
    assert report["rule"] == "imatrix" and report["imatrix"]["depth"] == DEPTH
    experts = 8
    tensors = {t["name"]: t for t in report["tensors"]}
    assert tensors[FUSED_DOWN_1]["rule"] == "mse3 (no statistics)"
    assert tensors[FUSED_GATE_UP_0]["modules_fallback"] == 2  # expert 3: gate and up
    assert report["imatrix"]["modules_fallback"] == experts + 2
    assert report["imatrix"]["modules_calibrated"] == 4 * 2 * experts * 3 // 2 - experts - 2
    assert report["imatrix"]["tensors_with_fallback"] == [FUSED_GATE_UP_0, FUSED_DOWN_1]
    src, out = load_tensors(tiny_qwen3_moe_fused), load_tensors(dst)
    sums, tokens = load_file(str(fused_stats / STATS_NAME)), None
    w = src[FUSED_GATE_UP_0]  # [E, 2I, H]
    half = w.shape[1] // 2
    for e in range(experts):
        tokens = sums[f"{FUSED_GATE_UP_0}:tokens"][e]
        for proj, rows in (("gate_proj", slice(0, half)), ("up_proj", slice(half, None))):
            want = (quantize(w[e, rows]) if tokens == 0 else
                    quantize_weighted(w[e, rows], sums[f"{FUSED_GATE_UP_0}:x2_sum"][e] / tokens, DEPTH))
            got = f"model.layers.0.mlp.experts.{e}.{proj}"
            assert torch.equal(out[got + ".weight_packed"], want.packed), got
            assert torch.equal(out[got + ".weight_scale"], want.scales), got
    down = quantize(src[FUSED_DOWN_1][5])
    assert torch.equal(out["model.layers.1.mlp.experts.5.down_proj.weight_scale"], down.scales)
    check = verify(dst, tiny_qwen3_moe_fused)
    assert check.ok, check.summary()
    assert "every exponent within R-2..R" in check.summary()
    card = (dst / "README.md").read_text()
    assert "`imatrix`" in card and f"{experts + 2} of {report['imatrix']['modules_calibrated'] + experts + 2} modules" in card
    assert_expert_coverage(dst, tiny_qwen3_moe_fused / "README.md", report, src, out, sums)


def assert_expert_coverage(dst: Path, readme: Path, report: dict, src: dict, out: dict, sums: dict) -> None:
    """The report and card of an imatrix MoE run show what calibration saw: routed tokens per expert as STATS
    counted them, each expert's weight error as its decoded output gives it; the heatmap beside the card is
    linked, and without matplotlib the card says how to draw it and nothing fails."""
    layers = experts_layers(report)
    assert [x.module for x in layers] == [f"model.layers.{i}.mlp.experts" for i in range(4)]
    assert layers[0].routed == sums[f"{FUSED_GATE_UP_0}:routed"].tolist() and sum(layers[0].routed) == 2 * 24 * 2
    for e in (0, 3):  # expert 3 of layer 0 fell back to mse3 for its gate/up projection
        err = norm = 0.0
        for proj, part in (("gate_proj", 0), ("up_proj", 1), ("down_proj", None)):
            w = src[FUSED_GATE_UP_0 if part is not None else "model.layers.0.mlp.experts.down_proj"][e]
            w = w.double() if part is None else w.chunk(2)[part].double()
            name = f"model.layers.0.mlp.experts.{e}.{proj}"
            q = dequantize(out[name + ".weight_packed"], out[name + ".weight_scale"], torch.float32).double()
            err, norm = err + float(((q - w) ** 2).sum()), norm + float((w ** 2).sum())
        assert layers[0].rel_error[e] == pytest.approx(err / norm, rel=1e-9)
    card = (dst / "README.md").read_text()
    assert "## Calibration coverage" in card and f"`{layers[0].module}` | 8 " in card
    assert f"![Routed calibration tokens and weight error per expert]({PLOT_NAME})" in card
    png = (dst / PLOT_NAME).read_bytes()
    assert png.startswith(b"\x89PNG") and b"tIME" not in png and b"Software" not in png
    with pytest.MonkeyPatch.context() as mp:
        for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
            mp.setitem(sys.modules, module, None)  # as if matplotlib were not installed
        write_card(dst, readme)
        assert not (dst / PLOT_NAME).exists() and PLOT_HOWTO in (dst / "README.md").read_text()
    write_card(dst, readme)
    assert (dst / PLOT_NAME).read_bytes() == png and (dst / "README.md").read_text() == card


def test_per_expert_names_and_determinism(tiny_mixtral: Path, tmp_path: Path) -> None:
    """Per-expert source names (Mixtral w1/w2/w3) read their own [in] statistics; all-experts statistics
    cover every expert; two runs write the same bytes."""
    stats = _stats(tiny_mixtral, tmp_path / "stats")
    outs = [tmp_path / "a" / "q", tmp_path / "b" / "q"]  # the card is titled with the directory's name
    for dst in outs:
        dst.parent.mkdir()
        res = _quantize(tiny_mixtral, dst, "--method", "imatrix", "--calib", stats)
        assert res.exit_code == 0, res.output
    names = assert_same_files(*outs, skip=(REPORT_NAME,))
    assert {"README.md", PLOT_NAME} <= set(names) and any(n.endswith(".safetensors") for n in names)
    report = json.loads((outs[0] / "qstream_report.json").read_text())
    assert report["imatrix"]["modules_fallback"] == 0 and report["imatrix"]["modules_calibrated"] == 2 * 4 * 3
    name = "model.layers.1.block_sparse_moe.experts.2.w2"
    sums = load_file(str(stats / STATS_NAME))
    want = quantize_weighted(load_tensors(tiny_mixtral)[name + ".weight"],
                             sums[f"{name}.weight:x2_sum"] / sums[f"{name}.weight:tokens"], DEPTH)
    out = load_tensors(outs[0])
    assert torch.equal(out[name + ".weight_packed"], want.packed) and torch.equal(out[name + ".weight_scale"], want.scales)
    mse3 = quantize(load_tensors(tiny_mixtral)[name + ".weight"])
    assert not torch.equal(want.scales, mse3.scales)  # the statistics did change some exponents
    assert verify(outs[0], tiny_mixtral).ok
    rtn = tmp_path / "rtn"
    assert _quantize(tiny_mixtral, rtn).exit_code == 0
    # The format is unchanged, so what vLLM reads (`verify --vllm` reads config and headers) is the same.
    assert (rtn / "config.json").read_bytes() == (outs[0] / "config.json").read_bytes()
    assert read_header(rtn / "model-00001-of-00001.safetensors").tensors == \
        read_header(outs[0] / "model-00001-of-00001.safetensors").tensors


def _poke_output(dst: Path, name: str, fn) -> None:
    """Apply fn to one output tensor's bytes in place (same dtype and shape)."""
    shard = dst / json.loads((dst / INDEX_NAME).read_text())["weight_map"][name] if (dst / INDEX_NAME).exists() \
        else dst / "model.safetensors"
    info = read_header(shard).tensors[name]
    t = read_rows(shard, info, 0, info.shape[0]).clone()
    fn(t)
    with open(shard, "r+b") as f:
        f.seek(info.start)
        f.write(t.numpy().tobytes())


def test_verify_catches_wrong_codes_and_exponents(tiny_mixtral: Path, tmp_path: Path) -> None:
    stats = _stats(tiny_mixtral, tmp_path / "stats")
    good = tmp_path / "good"
    assert _quantize(tiny_mixtral, good, "--method", "imatrix", "--calib", stats).exit_code == 0
    name = "model.layers.0.block_sparse_moe.experts.1.w1"
    src = load_tensors(tiny_mixtral)[name + ".weight"]

    code = tmp_path / "code"
    shutil.copytree(good, code)
    _poke_output(code, name + ".weight_packed", lambda t: t.__setitem__((3, 5), t[3, 5] ^ 0x01))
    check = verify(code, tiny_mixtral)
    assert not check.ok and any(f.startswith(f"{name}: 1 of") and "not the nearest" in f for f in check.failures)

    outside = tmp_path / "outside"
    shutil.copytree(good, outside)
    r = int(quantize(src, Rule.RCEIL).scales[7, 1])

    def too_deep(t: torch.Tensor) -> None:  # an exponent below the set, with codes nearest under it
        t[7, 1] = r - DEPTH - 1

    _poke_output(outside, name + ".weight_scale", too_deep)
    scales = load_tensors(outside)[name + ".weight_scale"]
    e = scales.to(torch.int32) - 127
    _poke_output(outside, name + ".weight_packed",
                 lambda t: t.copy_(encode(to_blocks(src), e, e, tuple(src.shape)).packed))
    check = verify(outside, tiny_mixtral)
    assert not check.ok and any("exponent outside R-2..R" in f for f in check.failures), check.summary()
    assert not any(f.startswith(f"{name}:") and "1 of" not in f for f in check.failures)


IMATRIX_REFUSALS = {
    "no statistics file": (lambda stats: ["--calib", stats.parent / "missing"], "no calibration.safetensors"),
    "statistics of another model": (lambda stats: ["--calib", stats], "needs F64[8, 64]"),
    "another rule": (lambda stats: ["--calib", stats, "--rule", "floor"], "--rule floor"),
}


@pytest.mark.parametrize("case", list(IMATRIX_REFUSALS))
def test_imatrix_refusals(case: str, tiny_qwen3_moe_fused: Path, tiny_llama: Path, tmp_path: Path) -> None:
    stats = _stats(tiny_qwen3_moe_fused, tmp_path / "stats")

    def wrong_shape(t: dict) -> None:  # e.g. statistics of a model with a wider hidden size
        t[f"{FUSED_GATE_UP_0}:x2_sum"] = torch.zeros(8, 96, dtype=torch.float64)

    _edit_stats(stats, wrong_shape)
    args, names = IMATRIX_REFUSALS[case]
    before = tree_hashes(tiny_qwen3_moe_fused)
    dst = tmp_path / "dst"
    res = _quantize(tiny_qwen3_moe_fused, dst, "--method", "imatrix", *args(stats))
    assert_refused(res, names, tiny_qwen3_moe_fused, before, dst)


def test_calib_needs_imatrix(tiny_llama: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    res = _quantize(tiny_llama, dst, "--preset", "mlp", "--calib", tmp_path)
    assert_refused(res, "--calib", tiny_llama, tree_hashes(tiny_llama), dst)


def test_imatrix_without_calib_calibrates_first(tiny_qwen35: Path, tmp_path: Path) -> None:
    """Without --calib, quantize runs `qstream calibrate` (same settings, beside DST's staging directory) and then
    writes the very bytes that calibrating by hand and passing --calib write; a --resume reuses the statistics."""
    src = tmp_path / "src"
    shutil.copytree(tiny_qwen35, src)
    byte_tokenizer(src)  # any text tokenizes
    prose = tmp_path / "prose.txt"
    prose.write_text(PROSE)
    small = ["--calib-samples", "2", "--calib-seq-len", "64"]
    res = _quantize(src, tmp_path / "auto", "--method", "IMATRIX", "--calib-text", prose, *small, "--device", "cpu")
    assert res.exit_code == 0, res.output
    stats = calib_dir_for(tmp_path / "auto")
    assert (stats / STATS_NAME).is_file() and not temp_dir_for(stats).exists()
    report = json.loads((tmp_path / "auto" / REPORT_NAME).read_text())
    assert report["rule"] == "imatrix" and report["imatrix"]["modules_calibrated"] > 0
    assert report["imatrix"]["stats"] == str(stats)
    res = CliRunner().invoke(cli, ["calibrate", str(src), str(tmp_path / "hand"), "--text-file", str(prose),
                                   "--samples", "2", "--seq-len", "64", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (stats / STATS_NAME).read_bytes() == (tmp_path / "hand" / STATS_NAME).read_bytes()
    res = _quantize(src, tmp_path / "by-hand", "--method", "imatrix", "--calib", tmp_path / "hand", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert_same_files(tmp_path / "auto", tmp_path / "by-hand", skip=(REPORT_NAME, "README.md"))
    again = calib_dir_for(tmp_path / "again")
    shutil.copytree(stats, again)  # as a run interrupted after calibrating leaves them
    mtime = (again / STATS_NAME).stat().st_mtime_ns
    res = _quantize(src, tmp_path / "again", "--method", "imatrix", "--resume", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (again / STATS_NAME).stat().st_mtime_ns == mtime  # reused, not calibrated again
    assert_same_files(tmp_path / "auto", tmp_path / "again", skip=(REPORT_NAME, "README.md"))
    assert (CALIB_SAMPLES, CALIB_SEQ_LEN) == (DEFAULT_SAMPLES, DEFAULT_SEQ_LEN)  # the CLI's copy is torch-free
    res = _quantize(src, tmp_path / "dst", "--calib-samples", "2")
    assert res.exit_code == 2 and "--calib-samples is used by --method imatrix without --calib" in res.output


def test_weightings_and_settings(tiny_llama: Path, tmp_path: Path) -> None:
    """The llama.cpp-style weighting multiplies each channel's mean x^2 by sqrt(mean w^2 of the row + w^2);
    smoothing adds a share of the mean; bad settings are refused by name."""
    from qstream.calib.channel_weights import ChannelWeights, ImatrixSettings
    from qstream.errors import QstreamError
    from qstream.io.checkpoint import open_checkpoint
    from qstream.planning.plan import make_plan
    from qstream.planning.selection import Selection

    stats = _stats(tiny_llama, tmp_path / "stats")
    plan = make_plan(open_checkpoint(tiny_llama), Selection("mlp"), Rule.MSE3, 10**9)
    job = next(j for s in plan.shards for j in s.jobs if getattr(j, "module", "").endswith("layers.1.mlp.up_proj"))
    w = job.source.read_rows(job.row_start, job.row_end)
    sums = load_file(str(stats / STATS_NAME))
    a = sums[f"{job.source.name}:x2_sum"] / sums[f"{job.source.name}:tokens"]
    plain = ChannelWeights(ImatrixSettings(stats), plan)
    assert torch.equal(plain.for_job(job), a)
    smooth = ChannelWeights(ImatrixSettings(stats, mean_fraction=0.1), plan)
    assert torch.equal(smooth.for_job(job), a + 0.1 * a.mean())
    llama = ChannelWeights(ImatrixSettings(stats, weighting="x2-sqrt"), plan)
    w2 = w.double() ** 2
    want = quantize_weighted(w, a * torch.sqrt(w2.mean(-1, keepdim=True) + w2), DEPTH)
    got = llama.quantize(w, llama.for_job(job))
    assert torch.equal(got.packed, want.packed) and torch.equal(got.scales, want.scales)
    for bad, names in ((ImatrixSettings(stats, depth=MAX_DEPTH + 1), "depth"),
                       (ImatrixSettings(stats, mean_fraction=-1.0), "mean fraction"),
                       (ImatrixSettings(stats, weighting="abs"), "weighting")):
        with pytest.raises(QstreamError, match=names):
            ChannelWeights(bad, plan)
