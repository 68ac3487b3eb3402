"""FP8 and MXFP8 inputs: detected from config.json, decoded on the fly, scales never leaked."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qstream.check.verify import verify
from qstream.errors import QstreamError
from qstream.format.mxfp4 import quantize
from qstream.format.rules import Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.planning.plan import make_plan
from qstream.planning.selection import Selection
from qstream.quantize import quantize_checkpoint
from tests.fixtures import load_tensors
from tests.fp8_layouts import LAYOUTS, to_layout


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_quantized_input_decoded_then_quantized_unselected_decoded(tmp_path, tiny_qwen3_moe, layout) -> None:
    """--keep-dtype bf16: selected weights quantized from the decoded values, the rest written as them."""
    src = tmp_path / "src"
    expected = to_layout(tiny_qwen3_moe, src, layout)
    dst = tmp_path / "q"
    report = quantize_checkpoint(make_plan(open_checkpoint(src), Selection("experts"), Rule.MSE3, 10**9, keep_dtype="bf16"), dst,
                 device="cpu", progress=False)
    out = load_tensors(dst)
    assert not any(k.endswith(("_scale_inv", "input_scale")) for k in out)
    assert not any(k.endswith(".weight_scale") and k.removesuffix("_scale") + "_packed" not in out for k in out)
    assert all(v.dtype != torch.float8_e4m3fn for v in out.values())
    checked = 0
    for name, ref in expected.items():
        module = name.removesuffix(".weight")
        if f"{module}.weight_packed" in out:  # quantized from the decoded values
            q = quantize(ref, Rule.MSE3)
            assert torch.equal(out[f"{module}.weight_packed"], q.packed) and torch.equal(
                out[f"{module}.weight_scale"], q.scales), name
        else:  # kept: written as the decoded BF16
            assert torch.equal(out[name], ref), name
        checked += 1
    assert checked == len(expected) and report["totals"]["tensors_quantized"] > 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "mxfp4-pack-quantized"
    assert report["keep_dtype"] == "bf16" and report["kept_source_formats"] == {}


# layout -> the format its kept weights are stored in, and the group's compressed-tensors format
KEPT = {"fp8-block": ("FP8", "float-quantized"), "ct-fp8": ("FP8", "float-quantized"),
        "ct-mxfp8": ("MXFP8", "mxfp8-quantized")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unselected_weights_keep_source_precision(tmp_path, tiny_qwen3_moe, layout) -> None:
    """The default: weights not quantized keep their FP8 bytes and scales (renamed to compressed-tensors'
    weight_scale), described by their own config group beside the MXFP4 one; vLLM's rules resolve every
    module to the format it is stored in."""
    src = tmp_path / "src"
    expected = to_layout(tiny_qwen3_moe, src, layout)
    source = load_tensors(src)
    dst = tmp_path / "q"
    report = quantize_checkpoint(make_plan(open_checkpoint(src), Selection("experts"), Rule.MSE3, 10**9), dst, device="cpu",
                 progress=False)
    out = load_tensors(dst)
    suffix = LAYOUTS[layout][1]
    kept = quantized = 0
    for name, ref in expected.items():
        module = name.removesuffix(".weight")
        if f"{module}.weight_packed" in out:
            q = quantize(ref, Rule.MSE3)
            assert torch.equal(out[f"{module}.weight_packed"], q.packed), name
            quantized += 1
        else:
            assert out[name].dtype == torch.float8_e4m3fn and torch.equal(out[name].view(torch.uint8),
                                                                          source[name].view(torch.uint8)), name
            assert torch.equal(out[f"{module}.weight_scale"], source[f"{module}.{suffix}"]), name
            kept += 1
    assert kept and quantized
    assert not any(k.endswith("_scale_inv") for k in out)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    fmt, ct_format = KEPT[layout]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 2
    group = qc["config_groups"]["group_1"]
    assert group["format"] == ct_format and group["weights"]["num_bits"] == 8
    assert report["kept_source_formats"] == {fmt: kept}
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(qc)
    assert verify(dst, src).ok, verify(dst, src).summary()
    card = (dst / "README.md").read_text()  # says what is stored, from DST's own headers and config
    assert re.search(rf"\| language attention +\| {fmt} \(as the source\) +\|", card) and "`mixed-precision`" in card
    assert f"- Kept in the source's {fmt} (a `{ct_format}` config group naming its modules):" in card


@pytest.mark.parametrize("exclude", [(), ("*.layers.1.mlp.experts.*",)], ids=["attention-kept", "experts-kept"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixed_output_reads_back_as_compressed_tensors_decodes_it(tmp_path, tiny_qwen3_moe, layout, exclude) -> None:
    """dequantize and eval's loader decode a kept weight to its format's definition, which is what
    compressed-tensors' own decompressor gives from the output's tensors and config group; a layer's kept
    experts too, though the group's targets name only their expert 0 (as vLLM looks them up)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from qstream.convert.dequantize import dequantize_checkpoint
    from qstream.evals.models import load_model

    src = tmp_path / "src"
    expected = to_layout(tiny_qwen3_moe, src, layout)
    q = tmp_path / "q"
    quantize_checkpoint(make_plan(open_checkpoint(src), Selection("experts", exclude=exclude), Rule.MSE3, 10**9), q,
                        device="cpu", progress=False)
    report = dequantize_checkpoint(q, tmp_path / "dq", progress=False)
    dense, out = load_tensors(tmp_path / "dq"), load_tensors(q)
    group = json.loads((q / "config.json").read_text())["quantization_config"]["config_groups"]["group_1"]
    scheme = QuantizationScheme.model_validate(group)
    decompressor = BaseCompressor.get_value_from_registry(scheme.format)
    kept = [n for n in expected if n in out]  # the quantized ones became weight_packed
    assert kept and report["modules_decoded_from_fp8"] == len(kept)
    assert any(".layers.1.mlp.experts.1." in n for n in kept) == bool(exclude)
    for name in kept:
        module = name.removesuffix(".weight")
        theirs = decompressor.decompress({"weight": out[name], "weight_scale": out[f"{module}.weight_scale"]},
                                         scheme)["weight"].to(torch.bfloat16)
        assert torch.equal(dense[name], expected[name]) and torch.equal(dense[name], theirs), name
    assert all(v.dtype == torch.bfloat16 for k, v in dense.items() if k in expected)
    model = load_model(q, torch.bfloat16, torch.device("cpu"))
    params = dict(model.named_parameters())
    assert all(torch.equal(loaded(params, n), dense[n]) for n in kept)
    source = dict(load_model(src, torch.bfloat16, torch.device("cpu")).named_parameters())  # eval's FP8 source
    assert all(torch.equal(loaded(source, n), expected[n]) for n in expected)


def loaded(params: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """What a transformers model loaded for source weight `name`: itself, or one expert's rows of the fused
    experts parameter it was stacked into (gate then up in gate_up_proj)."""
    if name in params:
        return params[name]
    prefix, e, proj = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)\.weight", name).groups()
    if proj == "down_proj":
        return params[f"{prefix}.down_proj"][int(e)]
    gate, up = params[f"{prefix}.gate_up_proj"][int(e)].chunk(2)
    return gate if proj == "gate_proj" else up


def test_mxfp8_decode_matches_compressed_tensors(tmp_path, tiny_qwen3_moe) -> None:
    """The decoded MXFP8 values equal compressed-tensors' own decompression."""
    from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    src = tmp_path / "src"
    to_layout(tiny_qwen3_moe, src, "ct-mxfp8")
    ckpt = open_checkpoint(src)
    from qstream.io.source_formats import decode_checkpoint

    decoded = decode_checkpoint(ckpt)
    scheme = QuantizationConfig.model_validate(LAYOUTS["ct-mxfp8"][0]).config_groups["group_0"]
    name = "model.layers.0.self_attn.q_proj.weight"
    raw = {k: ckpt.tensors[f"model.layers.0.self_attn.q_proj.{k}"] for k in ("weight", "weight_scale")}
    state = {k: t.read_rows(0, t.info.shape[0]) for k, t in raw.items()}
    theirs = MXFP8QuantizationCompressor.decompress(state, scheme)["weight"]
    ours = decoded.tensors[name].read_rows(0, decoded.tensors[name].info.shape[0])
    assert torch.equal(ours, theirs.to(torch.bfloat16))


def test_unsupported_format_lists_supported(tmp_path, tiny_llama) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QstreamError, match=r"already quantized \(gptq\).*Supported inputs: .*fp8-block.*ct-mxfp8"):
        make_plan(open_checkpoint(src), Selection("mlp"), Rule.MSE3, 10**9)


def test_e5m2_weights_cannot_be_kept(tmp_path, tiny_qwen3_moe) -> None:
    """compressed-tensors' FP8 is E4M3: an E5M2 weight to keep is refused with the way out, which works."""
    from tests.test_bad_input import assert_refused, qstream, rewrite_header, tree_hashes

    src = tmp_path / "src"
    to_layout(tiny_qwen3_moe, src, "fp8-block")
    name = "model.layers.1.self_attn.o_proj.weight"
    rewrite_header(next(src.glob("*.safetensors")), lambda h: h[name].update(dtype="F8_E5M2"))  # same bytes
    before, dst = tree_hashes(src), tmp_path / "dst"
    msg = assert_refused(qstream("quantize", src, dst, "--no-progress"), name, src, before, dst)
    assert "--keep-dtype bf16" in msg
    ok = qstream("quantize", src, dst, "--keep-dtype", "bf16", "--no-progress")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("break_it,text", [
    (lambda qc: qc["ignore"].append(qc["config_groups"]["group_1"]["targets"][0]), "FP8 on disk but matched by ignore"),
    (lambda qc: qc["config_groups"]["group_1"].update(targets=["re:^nothing$"]), "FP8 on disk but targeted by no"),
    (lambda qc: qc["config_groups"]["group_0"].update(targets=["Linear"]), "must name its modules"),
])
def test_verify_catches_a_mixed_config_that_misreads_kept_weights(tmp_path, tiny_qwen3_moe, break_it, text) -> None:
    src = tmp_path / "src"
    to_layout(tiny_qwen3_moe, src, "fp8-block")
    dst = tmp_path / "q"
    quantize_checkpoint(make_plan(open_checkpoint(src), Selection("experts"), Rule.MSE3, 10**9), dst, device="cpu", progress=False)
    cfg = json.loads((dst / "config.json").read_text())
    break_it(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    report = verify(dst)
    assert not report.ok and any(text in f for f in report.failures), report.summary()


def test_block_decode_with_ragged_blocks_is_the_definition(tmp_path) -> None:
    """Rows and columns that do not fill their last 32x32 block, read in chunks that cut through blocks."""
    from qstream.io.source_formats import DecodedTensor, _float

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(70, 100, generator=g) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(3, 4, generator=g) + 0.5
    save_file({"m.weight": w, "m.weight_scale_inv": s}, tmp_path / "x.safetensors")
    (tmp_path / "config.json").write_text("{}")
    t = open_checkpoint(tmp_path).tensors
    d = DecodedTensor(t["m.weight"].info, t["m.weight"], t["m.weight_scale_inv"], (32, 32), _float, stored=(), scheme={})
    expected = (w.float() * s.repeat_interleave(32, 0)[:70].repeat_interleave(32, 1)[:, :100]).to(torch.bfloat16)
    assert torch.equal(torch.cat([d.read_rows(0, 13), d.read_rows(13, 45), d.read_rows(45, 70)]), expected)


def test_deepseek_v3_block_fp8_keeps_attention_and_dense_layers(tmp_path, tiny_deepseek_v3) -> None:
    """DeepSeek-V3's own layout: MLA projections, the dense first layer and the shared expert stay block FP8,
    named by coarse targets (vLLM fuses q_a_proj with kv_a_proj_with_mqa: both must stay FP8 together)."""
    src = tmp_path / "src"
    expected = to_layout(tiny_deepseek_v3, src, "fp8-block")
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in expected  # MLA counts as attention
    dst = tmp_path / "q"
    quantize_checkpoint(make_plan(open_checkpoint(src), Selection("experts"), Rule.MSE3, 10**9), dst, device="cpu", progress=False)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == [r"re:.*\.experts\..*"]
    assert set(qc["config_groups"]["group_1"]["targets"]) == {
        r"re:.*\.self_attn\..*", r"re:.*\.shared_experts?\..*", r"re:.*\.mlp\.(?:gate_proj|up_proj|down_proj|gate_up_proj)$"}
    report = verify(dst, src)
    assert report.ok, report.summary()
    with pytest.raises(QstreamError, match="fused_qkv_a_proj: vLLM loads its parts as one module"):
        make_plan(open_checkpoint(src), Selection("experts", include=("*.layers.0.self_attn.q_a_proj.weight",)),
                  Rule.MSE3, 10**9)



@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_quantize_dequantize_quantize_from_fp8(tmp_path, tiny_qwen3_moe, layout) -> None:
    """A mixed output, dequantized and quantized again, decodes to exactly what quantizing the FP8 input with
    --keep-dtype bf16 decodes to: kept weights come back as the BF16 they stand for, MXFP4 as a fixed point."""
    from qstream.convert.dequantize import dequantize_checkpoint

    src = tmp_path / "src"
    to_layout(tiny_qwen3_moe, src, layout)

    def quantize(source: Path, dst: Path, keep: str) -> Path:
        quantize_checkpoint(make_plan(open_checkpoint(source), Selection("experts"), Rule.MSE3, 10**9, keep_dtype=keep), dst,
            device="cpu", progress=False)
        return dst

    dequantize_checkpoint(quantize(src, tmp_path / "q1", "source"), tmp_path / "d1", progress=False)
    dequantize_checkpoint(quantize(tmp_path / "d1", tmp_path / "q2", "source"), tmp_path / "d2", progress=False)
    dequantize_checkpoint(quantize(src, tmp_path / "qb", "bf16"), tmp_path / "db", progress=False)
    again, direct = load_tensors(tmp_path / "d2"), load_tensors(tmp_path / "db")
    assert again.keys() == direct.keys() and all(torch.equal(again[k], direct[k]) for k in again)
