"""End to end on tiny real-layout checkpoints: exactly the intended tensors change, and the
output decodes (ours and compressed-tensors') to the reference quantization of the source."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qstream.common import REPORT_NAME
from qstream.errors import QstreamError
from qstream.format.formats import BF16, MXFP4
from qstream.format.mxfp4 import dequantize, quantize
from qstream.format.names import matches
from qstream.format.rules import Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.planning.plan import make_plan
from qstream.planning.selection import Region, Role, Selection
from qstream.planning.targets import Module, targeting_problems
from qstream.quantize import quantize_checkpoint
from tests.fixtures import assert_same_bytes, assert_same_files, first_difference, load_tensors

FIXTURES = {
    # fixture -> (preset, source tensors that must be quantized)
    "tiny_qwen35": ("experts", re.compile(r"^model\.language_model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")),
    "tiny_qwen3_moe": ("experts", re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")),
    "tiny_qwen3_moe_fused": ("experts", re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")),
    "tiny_mixtral": ("experts", re.compile(r"\.block_sparse_moe\.experts\.\d+\.w[123]\.weight$")),
    "tiny_llama": ("mlp", re.compile(r"\.mlp\.(gate|up|down)_proj\.weight$")),
}


def quantize_dir(src: Path, dst: Path, preset: str, rule: Rule = Rule.MSE3, shard: int = 5 * 10**9, **kw) -> dict:
    plan = make_plan(open_checkpoint(src), Selection(preset, **kw), rule, shard)
    return quantize_checkpoint(plan, dst, device="cpu", progress=False)


def expected_modules(name: str, w: torch.Tensor, config: dict) -> dict[str, torch.Tensor]:
    """Output module name -> the source slice it must hold (fused experts split per expert)."""
    fused = re.match(r"^(.*\.experts)\.(gate_up_proj|down_proj)$", name)
    if not fused:
        return {name.removesuffix(".weight"): w}
    prefix, kind = fused.groups()
    if kind == "down_proj":
        return {f"{prefix}.{e}.down_proj": w[e] for e in range(w.shape[0])}
    half = w.shape[1] // 2
    out = {}
    for e in range(w.shape[0]):
        out[f"{prefix}.{e}.gate_proj"] = w[e, :half]
        out[f"{prefix}.{e}.up_proj"] = w[e, half:]
    return out


@pytest.fixture(scope="module", params=list(FIXTURES))
def quantized(request, tmp_path_factory):
    src = request.getfixturevalue(request.param)
    dst = tmp_path_factory.mktemp("out") / "q"
    preset, pattern = FIXTURES[request.param]
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    report = quantize_dir(src, dst, preset)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    assert before == after, "the source must never change"
    return src, dst, pattern, report


def test_exactly_intended_tensors_change(quantized) -> None:
    src, dst, pattern, _ = quantized
    s, q = load_tensors(src), load_tensors(dst)
    config = json.loads((src / "config.json").read_text())
    selected = [n for n in s if pattern.search(n)]
    assert selected, "fixture has no tensor the recipe should quantize"
    expected_names = set()
    for name, w in s.items():
        if name in selected:
            for module, part in expected_modules(name, w, config).items():
                expected_names |= {f"{module}.weight_packed", f"{module}.weight_scale"}
                ref = quantize(part, Rule.MSE3)  # held to mxfp4_ref bit for bit in test_mxfp4
                assert torch.equal(q[f"{module}.weight_packed"], ref.packed), module
                assert torch.equal(q[f"{module}.weight_scale"], ref.scales), module
        else:
            expected_names.add(name)
            assert q[name].dtype == w.dtype and torch.equal(q[name].view(torch.uint8), w.view(torch.uint8)), name
    assert set(q) == expected_names


def test_side_files_and_index(quantized) -> None:
    src, dst, _, _ = quantized
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            assert_same_bytes((dst / f.name).read_bytes(), f.read_bytes(), f.name)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    on_disk = {}
    for f in dst.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            on_disk.update({k: f.name for k in h.keys()})
    assert index["weight_map"] == on_disk
    assert index["metadata"]["total_size"] == sum(
        f.stat().st_size for f in dst.glob("*.safetensors")
    ) - sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in dst.glob("*.safetensors"))
    assert not any(p.name.startswith(".qstream") for p in dst.iterdir())
    assert not any(p.name.startswith(f".{dst.name}") for p in dst.parent.iterdir())


def test_config_and_ignore_as_vllm_matches(quantized) -> None:
    src, dst, _, report = quantized
    cfg = json.loads((dst / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    assert cfg == src_cfg
    assert qc["format"] == "mxfp4-pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert qc["config_groups"]["group_0"]["weights"]["scale_dtype"] == "torch.uint8"
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.config_groups["group_0"].weights.group_size == 32
    # Rebuild the modules from the output's own tensor names, independently of the planner.
    names = list(load_tensors(dst))
    modules: dict[str, Module] = {}
    for n in names:
        base = re.sub(r"\.(weight|weight_packed|weight_scale)$", "", n)
        expert = re.match(r"^(.*\.experts)\.(\d+\.\w+|gate_up_proj|down_proj)$", base)
        if n.endswith((".weight_packed", ".weight_scale")) or (n.endswith(".weight") and _is_linear(n, src)) or expert:
            key = expert[1] if expert else base
            region = Region.MTP if key.startswith("mtp.") else Region.VISUAL if ".visual." in key else Region.LANGUAGE
            role = Role.ROUTED_EXPERT if expert else Role.OTHER
            packed = n.endswith((".weight_packed", ".weight_scale")) or modules.get(key, Module(key, region, role, BF16)).quantized
            modules[key] = Module(key, region, role, MXFP4 if packed else BF16)
    assert targeting_problems(qc, list(modules.values())) == []
    assert report["ignore"] == qc["ignore"]


def _is_linear(name: str, src: Path) -> bool:
    for f in src.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            if name in h.keys():
                return len(h.get_slice(name).get_shape()) == 2 and "embed" not in name
    return False


def test_compressed_tensors_decodes_to_our_floats(quantized) -> None:
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    _, dst, _, _ = quantized
    qc = QuantizationConfig.model_validate(json.loads((dst / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    q = load_tensors(dst)
    for name in [n for n in q if n.endswith(".weight_packed")][:40]:
        module = name.removesuffix(".weight_packed")
        packed, scale = q[name], q[f"{module}.weight_scale"]
        theirs = MXFP4PackedCompressor.decompress({"weight_packed": packed, "weight_scale": scale}, scheme)["weight"]
        ours = dequantize(packed, scale, torch.bfloat16)
        assert theirs.dtype == torch.bfloat16
        assert torch.equal(theirs, ours), module


def test_report(quantized) -> None:
    src, dst, pattern, report = quantized
    on_disk = json.loads((dst / REPORT_NAME).read_text())
    assert on_disk["totals"]["bytes_out"] == report["totals"]["bytes_out"]
    names = [t["name"] for t in on_disk["tensors"]]
    assert names and all(pattern.search(n) for n in names)
    for t in on_disk["tensors"]:
        assert 0.001 < t["rel_error"] < 0.05, t
        assert sum(t["exponent_share"].values()) == pytest.approx(1.0)
        assert t["rule"] == "mse3"
    assert on_disk["totals"]["params_quantized"] > 0
    stages = on_disk["totals"]["stages"]  # disjoint stretches of the quantizing thread's time
    assert set(stages) == {"start", "read wait", "quantize", "write wait", "copy wait", "sync and close",
                           "index and side files"}
    assert min(stages.values()) >= 0 and sum(stages.values()) <= on_disk["totals"]["seconds"]


def test_peak_rss_is_the_commands_own() -> None:
    """Reports give the peak of the command itself: ru_maxrss of a process started by a large one (a bench, this
    test) would give the starter's peak, here over 1 GiB."""
    ballast = b"\1" * (1 << 30)  # resident in this process when the child is forked
    code = "from qstream.common import peak_rss_bytes; print(peak_rss_bytes())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert len(ballast) == 1 << 30 and 0 < int(out) < 1 << 30


def test_transformers_loads_and_logits_match_substituted_source(tmp_path, tiny_qwen3_moe, tiny_llama) -> None:
    """transformers (with compressed-tensors) loads our output; its logits equal the source
    model's with our dequantized weights substituted."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    for src, preset in ((tiny_qwen3_moe, "experts"), (tiny_llama, "mlp")):
        dst = tmp_path / src.name
        quantize_dir(src, dst, preset)
        loaded = AutoModelForCausalLM.from_pretrained(
            dst, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        state = {}
        q = load_tensors(dst)
        for n in q:
            if n.endswith(".weight_packed"):
                m = n.removesuffix(".weight_packed")
                state[m] = dequantize(q[n], q[f"{m}.weight_scale"], torch.float32)
        assert _substitute(ref, state) > 0
        mine, theirs = dict(ref.named_parameters()), dict(loaded.named_parameters())
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), "weights differ from our dequantization"
        ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = loaded(ids).logits, ref(ids).logits
        # equal weights; kernels chosen for a quantized model may sum in another order
        assert torch.allclose(a, b, rtol=0, atol=1e-3), (a - b).abs().max()


def _substitute(model: torch.nn.Module, modules: dict[str, torch.Tensor]) -> int:
    """Write dequantized weights into a plain transformers model (fused experts by slice)."""
    params = dict(model.named_parameters())
    n = 0
    for module, w in modules.items():
        if f"{module}.weight" in params:
            params[f"{module}.weight"].data.copy_(w)
        else:
            prefix, e, proj = re.match(r"^(.*\.experts)\.(\d+)\.(\w+)$", module).groups()
            e = int(e)
            if proj == "down_proj":
                params[f"{prefix}.down_proj"].data[e].copy_(w)
            else:
                gu = params[f"{prefix}.gate_up_proj"].data[e]
                half = gu.shape[0] // 2
                gu[(0 if proj == "gate_proj" else half):][:half].copy_(w)
        n += 1
    return n


def test_sharding_by_size(tmp_path, tiny_qwen3_moe) -> None:
    one = tmp_path / "one"
    many = tmp_path / "many"
    quantize_dir(tiny_qwen3_moe, one, "experts")
    report = quantize_dir(tiny_qwen3_moe, many, "experts", shard=64 * 1024)
    shards = sorted(many.glob("*.safetensors"))
    assert len(shards) == report["totals"]["shards"] > 2
    assert all(s.stat().st_size < 64 * 1024 + 16 * 1024 for s in shards)
    a, b = load_tensors(one), load_tensors(many)
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_rules_and_determinism(tmp_path, tiny_mixtral) -> None:
    outs = []
    for i, rule in enumerate((Rule.FLOOR, Rule.MSE3, Rule.MSE3)):
        outs.append(tmp_path / f"{rule.value}-{i}")
        quantize_dir(tiny_mixtral, outs[-1], "experts", rule=rule)
    a, b, c = outs
    shards = assert_same_files(b, c, "*.safetensors")
    assert shards and any(first_difference((a / n).read_bytes(), (b / n).read_bytes()) for n in shards)


def test_indivisible_and_selection_errors(tmp_path, tiny_llama_indivisible, tiny_llama, tiny_mixtral) -> None:
    with pytest.raises(QstreamError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: in_features 80"):
        quantize_dir(tiny_llama_indivisible, tmp_path / "a", "mlp")
    report = quantize_dir(tiny_llama_indivisible, tmp_path / "b", "mlp", skip_indivisible=True)
    assert matches(report["ignore"], "model.layers.0.mlp.down_proj")
    assert not matches(report["ignore"], "model.layers.0.mlp.gate_up_proj")
    with pytest.raises(QstreamError, match="no routed experts found .* use --preset mlp or --preset all-linear"):
        quantize_dir(tiny_llama, tmp_path / "c", "experts")
    with pytest.raises(QstreamError, match="block_sparse_moe.gate.weight: .* vLLM builds router layers unquantized"):
        quantize_dir(tiny_mixtral, tmp_path / "d", "mlp", include=("*.gate.weight",))
    with pytest.raises(QstreamError, match="embed_tokens.weight: .* vLLM builds embedding layers unquantized"):
        quantize_dir(tiny_llama, tmp_path / "d", "mlp", include=("*embed_tokens*",))
    with pytest.raises(QstreamError, match="qkv_proj: vLLM loads its parts as one module"):
        quantize_dir(tiny_llama, tmp_path / "e", "mlp", include=("*.q_proj.weight",))
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "c", tmp_path / "d", tmp_path / "e"))


def test_include_exclude_globs(tmp_path, tiny_qwen35) -> None:
    report = quantize_dir(tiny_qwen35, tmp_path / "q", "experts", exclude=("*.layers.0.*",),
                          include=("*.self_attn.*_proj.weight",))
    names = [t["name"] for t in report["tensors"]]
    assert not any(".layers.0." in n for n in names)
    assert any("self_attn.q_proj" in n for n in names)
    # mtp attention is matched by the include glob too; the ignore list still covers layer 0's experts
    assert matches(report["ignore"], "language_model.model.layers.0.mlp.experts.0.gate_proj")
    assert not matches(report["ignore"], "language_model.model.layers.1.mlp.experts.0.gate_proj")
    assert not matches(report["ignore"], "language_model.model.layers.3.self_attn.q_proj")


def test_already_quantized_refused(tmp_path, tiny_llama) -> None:
    quantize_dir(tiny_llama, tmp_path / "q", "mlp")
    with pytest.raises(QstreamError, match="already quantized"):
        quantize_dir(tmp_path / "q", tmp_path / "qq", "mlp")
