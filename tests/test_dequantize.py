"""qstream dequantize: MXFP4 checkpoints back to BF16, checked against compressed-tensors' own decoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import qstream.convert.dequantize as dq
from qstream.cli import cli
from qstream.convert.dequantize import dense_jobs, dequantize_checkpoint
from qstream.errors import QstreamError
from qstream.format.rules import Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.planning.plan import make_plan
from qstream.planning.selection import Selection
from qstream.quantize import quantize_checkpoint
from tests.fixtures import SIDE_FILES, assert_same_bytes, assert_same_files, load_tensors


def quantize(src: Path, dst: Path, preset: str = "experts", rule: Rule = Rule.MSE3, max_shard: int = 10**9) -> Path:
    quantize_checkpoint(make_plan(open_checkpoint(src), Selection(preset), rule, max_shard), dst, device="cpu", progress=False)
    return dst


def same_shards(a: Path, b: Path) -> None:
    assert_same_files(a, b, "*.safetensors")


CASES = [("tiny_llama", "mlp"), ("tiny_qwen3_moe_fused", "experts"), ("tiny_mixtral", "experts"),
         ("tiny_qwen35", "experts")]


@pytest.mark.parametrize("fixture,preset", CASES)
def test_dequantized_equals_compressed_tensors_decoding(fixture: str, preset: str, request, tmp_path: Path) -> None:
    """Plain transformers loads the output, and its weights are exactly what compressed-tensors decodes."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = request.getfixturevalue(fixture)
    q = quantize(src, tmp_path / "q", preset, max_shard=200_000)  # several shards
    report = dequantize_checkpoint(q, tmp_path / "dq", progress=False)
    out = tmp_path / "dq"

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    q_config = json.loads((q / "config.json").read_text())
    assert config == {k: v for k, v in q_config.items() if k != "quantization_config"}
    for side in SIDE_FILES:
        assert_same_bytes((out / side).read_bytes(), (src / side).read_bytes(), side)
    assert not (out / "qstream_report.json").exists()  # describes the MXFP4 checkpoint, not this one
    assert not any(p.name.startswith(".") for p in out.iterdir())

    qt, dt, st = load_tensors(q), load_tensors(out), load_tensors(src)
    packed = [k for k in qt if k.endswith(".weight_packed")]
    assert report["modules_dequantized"] == len(packed) > 0
    for name, t in dt.items():
        if name in qt:  # carried over: bit-identical to the quantized checkpoint and so to the source
            assert t.dtype == qt[name].dtype and torch.equal(t.view(torch.uint8), qt[name].view(torch.uint8)), name
        else:
            assert t.dtype == torch.bfloat16 and name.removesuffix(".weight") + ".weight_packed" in qt, name
    assert set(dt) == {k for k in qt if not k.endswith(".weight_scale")} - set(packed) | {
        k.removesuffix("_packed") for k in packed}
    assert sum(t.numel() for t in dt.values()) == sum(t.numel() for t in st.values())

    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert getattr(ours.config, "quantization_config", None) is None
    theirs = AutoModelForCausalLM.from_pretrained(q, dtype=torch.bfloat16,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("rule", list(Rule))
def test_quantize_dequantize_quantize(tiny_llama: Path, tmp_path: Path, rule: Rule) -> None:
    """Decoded values are a fixed point for every rule; bytes are one for floor/even at once, and for every
    rule after one round (rceil/mse3 may first move a block whose largest code is 3 to the exponent below,
    where the same values are coded with largest code 6)."""
    q1 = quantize(tiny_llama, tmp_path / "q1", "mlp", rule)
    d1 = tmp_path / "d1"
    dequantize_checkpoint(q1, d1, progress=False)
    q2 = quantize(d1, tmp_path / "q2", "mlp", rule)
    assert json.loads((q2 / "qstream_report.json").read_text())["totals"]["rel_error"] == 0.0
    dequantize_checkpoint(q2, tmp_path / "d2", progress=False)
    same_shards(tmp_path / "d2", d1)
    if rule in (Rule.FLOOR, Rule.EVEN):
        same_shards(q2, q1)
    q3 = quantize(tmp_path / "d2", tmp_path / "q3", "mlp", rule)
    same_shards(q3, q2)


def test_fixed_point_keeps_shards_and_fused_experts(tiny_qwen35: Path, tmp_path: Path) -> None:
    """Fused 3-D experts come back per expert (as written), and sharding is reproduced byte for byte."""
    q1 = quantize(tiny_qwen35, tmp_path / "q1", max_shard=300_000)
    dequantize_checkpoint(q1, tmp_path / "d", max_shard_bytes=300_000, progress=False)
    q2 = quantize(tmp_path / "d", tmp_path / "q2", max_shard=300_000)
    assert len(list(q1.glob("*.safetensors"))) > 1
    same_shards(q2, q1)
    assert_same_files(q2, q1, "model.safetensors.index.json")


def test_row_chunks_give_the_same_bytes(tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    q = quantize(tiny_llama, tmp_path / "q", "mlp")
    dequantize_checkpoint(q, tmp_path / "whole", progress=False)
    monkeypatch.setattr(dq, "CHUNK_ELEMENTS", 100)  # 1-row chunks of [*, 64] and [*, 128] weights
    dequantize_checkpoint(q, tmp_path / "rows", progress=False)
    same_shards(tmp_path / "rows", tmp_path / "whole")


def test_refuses_what_it_cannot_read(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(QstreamError, match=r"config\.json: no quantization_config") as err:
        dequantize_checkpoint(tiny_llama, tmp_path / "out", progress=False)
    assert str(tiny_llama) in str(err.value)

    fp8 = tmp_path / "fp8"
    shutil.copytree(tiny_llama, fp8)
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(QstreamError, match=r"fp8.*not compressed-tensors mxfp4-pack-quantized"):
        dequantize_checkpoint(fp8, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_a_packed_weight_without_scale(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    q = quantize(tiny_llama, tmp_path / "q", "mlp")
    shard = next(q.glob("*.safetensors"))
    state = load_file(shard)
    del state["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(state, shard)
    index = json.loads((q / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.down_proj.weight_scale"]
    (q / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(QstreamError, match=r"model\.layers\.1\.mlp\.down_proj\.weight_packed: has no .*weight_scale"):
        dense_jobs(open_checkpoint(q))


def test_cli(tiny_llama: Path, tmp_path: Path) -> None:
    q = quantize(tiny_llama, tmp_path / "q", "mlp")
    runner = CliRunner()
    res = runner.invoke(cli, ["dequantize", str(q), str(tmp_path / "dq")])
    assert res.exit_code == 0, res.output
    assert "6 MXFP4 modules -> BF16" in res.output
    res = runner.invoke(cli, ["dequantize", str(q), str(tmp_path / "dq")])
    assert res.exit_code == 2 and "already exists; pass --overwrite" in res.output
    res = runner.invoke(cli, ["dequantize", str(tiny_llama), str(tmp_path / "x")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "no quantization_config" in res.output
