"""qstream.planning.plan: the whole conversion from headers alone, before any data moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from qstream.errors import QstreamError
from qstream.format.formats import MXFP4_FORMAT
from qstream.format.rules import Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.io.safetensors_io import OutEntry
from qstream.planning.plan import CopyJob, QuantJob, estimate_bits_per_weight, make_plan, pack_shards, parse_size
from qstream.planning.selection import Selection
from tests.fixtures import tensor_shapes


def plan_of(src: Path, preset: str = "experts", max_shard: int = 10**9, **kw):
    return make_plan(open_checkpoint(src), Selection(preset), Rule.MSE3, max_shard, **kw)


def test_fused_experts_split_per_expert_and_projection(tiny_qwen35: Path) -> None:
    plan = plan_of(tiny_qwen35)
    jobs = {j.module: j for s in plan.shards for j in s.jobs if isinstance(j, QuantJob)}
    layer = "model.language_model.layers.0.mlp.experts"
    n_exp, two_i, hidden = tensor_shapes(tiny_qwen35)[f"{layer}.gate_up_proj"][0]
    gate, up = jobs[f"{layer}.3.gate_proj"], jobs[f"{layer}.3.up_proj"]
    assert (gate.row_start, gate.row_end, up.row_start, up.row_end) == (3 * two_i, 3 * two_i + two_i // 2,
                                                                        3 * two_i + two_i // 2, 4 * two_i)
    assert gate.entries == (OutEntry(f"{layer}.3.gate_proj.weight_packed", "U8", (two_i // 2, hidden // 2)),
                            OutEntry(f"{layer}.3.gate_proj.weight_scale", "U8", (two_i // 2, hidden // 32)))
    assert sum(f"{layer}." in m for m in jobs) == 3 * n_exp  # gate, up, down per expert
    assert abs(estimate_bits_per_weight(plan) - (MXFP4_FORMAT.bits + 8 / 32)) < 1e-12


def test_plan_accounts_for_every_source_tensor_and_byte(tiny_qwen3_moe: Path) -> None:
    plan = plan_of(tiny_qwen3_moe)
    sources = {j.source.name for s in plan.shards for j in s.jobs}
    assert sources == set(tensor_shapes(tiny_qwen3_moe))
    copied = [j for s in plan.shards for j in s.jobs if isinstance(j, CopyJob)]
    assert all(not plan.decisions[j.source.name].quantize for j in copied)
    assert plan.bytes_out == sum(e.nbytes for s in plan.shards for e in s.entries)
    qc = plan.quantization_config()
    assert qc["format"] == MXFP4_FORMAT.ct_format and qc["config_groups"]["group_0"]["weights"] == MXFP4_FORMAT.weights
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]


def test_shards_respect_the_size_limit(tiny_qwen3_moe: Path) -> None:
    plan = plan_of(tiny_qwen3_moe, max_shard=64 * 1024)
    assert len(plan.shards) > 1
    biggest_job = max(sum(e.nbytes for e in j.entries) for s in plan.shards for j in s.jobs)
    assert all(s.nbytes <= max(64 * 1024, biggest_job) for s in plan.shards)
    assert [s.file_name for s in plan.shards][-1] == f"model-{len(plan.shards):05d}-of-{len(plan.shards):05d}.safetensors"


def test_pack_shards_keeps_order_and_gives_a_big_job_its_own_file() -> None:
    class Job:
        def __init__(self, n: int) -> None:
            self.entries = (OutEntry(f"t{n}", "U8", (n,)),)

    shards = pack_shards([Job(3), Job(4), Job(10), Job(1)], max_shard_bytes=8)
    assert [[j.entries[0].shape[0] for j in s.jobs] for s in shards] == [[3, 4], [10], [1]]


def test_bad_settings_fail_before_any_data_moves(tiny_llama: Path) -> None:
    with pytest.raises(QstreamError, match=r"nothing to quantize: no routed experts found \(preset experts\); "
                                           "use --preset mlp or --preset all-linear"):
        plan_of(tiny_llama, "experts")
    assert plan_of(tiny_llama, "experts", allow_empty=True).quantized_sources == []  # `qstream plan` shows it
    with pytest.raises(QstreamError, match="keep dtype 'fp8' not understood; choose one of source, bf16"):
        plan_of(tiny_llama, "mlp", keep_dtype="fp8")


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1.5 kb", 1500),
                                           ("123", 123), ("2TiB", 2 * 2**40)])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_refuses_nonsense() -> None:
    with pytest.raises(QstreamError, match="size 'lots' not understood; write e.g. 5GB"):
        parse_size("lots")
