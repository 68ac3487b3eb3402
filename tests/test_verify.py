"""`qstream verify`: good outputs pass; each known way an output goes wrong is caught by the right check.

Outputs are written by the real `qstream quantize` (in-process) from the tiny real-layout fixtures,
then broken on disk the way peers' tools broke theirs: scale bytes off by a constant, NaN scales,
fused experts left in BF16 without an ignore entry, a missing tensor, a stale index. The fast source check is
held to the torch path: same verdicts, a block outside the kernel audit's sample still caught, and a broken
kernel (even one that wrote the output) caught by the audit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from qstream.calib.imatrix import quantize_weighted
from qstream.check import verify_source
from qstream.check.error_bound import Bound, block_errors, compare_chunk, compare_fast
from qstream.check.kernel_audit import Sampling
from qstream.check.verify import verify, verify_written
from qstream.cli import cli
from qstream.common import REPORT_NAME
from qstream.convert import pipeline
from qstream.errors import QstreamError
from qstream.format.kernels import quantize_fast
from qstream.format.mxfp4 import Quantized, pack_codes, quantize, unpack_codes
from qstream.format.rules import Rule
from qstream.io.checkpoint import CONFIG_NAME, IN_PROGRESS_MARKER, INDEX_NAME, open_checkpoint

L0 = "model.language_model.layers.0"
EXPERT = f"{L0}.mlp.experts.1.gate_proj"  # a quantized module of tiny_qwen35 (split from fused gate_up_proj)
COPIED = f"{L0}.input_layernorm.weight"


def run_quantize(src: Path, dst: Path, *args: str) -> None:
    result = CliRunner().invoke(cli, ["quantize", str(src), str(dst), "--no-progress", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def qwen35_out(tiny_qwen35, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "qwen35-mxfp4"
    run_quantize(tiny_qwen35, out)
    return out


@pytest.fixture
def broken(qwen35_out, tmp_path) -> Path:
    """A private copy of the good output, to break."""
    return Path(shutil.copytree(qwen35_out, tmp_path / "out"))


# ------------------------------------------------------------------------------------------ editing helpers


def edit_tensor(ckpt: Path, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Rewrite one tensor's bytes in place (same dtype and shape)."""
    st = open_checkpoint(ckpt, unfinished_ok=True).tensors[name]
    with open(st.file, "r+b") as f:
        f.seek(st.info.start)
        raw = bytearray(f.read(st.info.nbytes))
        t = torch.frombuffer(raw, dtype=st.info.torch_dtype).reshape(st.info.shape)
        new = fn(t.clone()).to(st.info.torch_dtype).contiguous()
        assert not torch.equal(new, t), "the edit must change something"
        f.seek(st.info.start)
        f.write(new.reshape(-1).view(torch.uint8).numpy().tobytes())


def edit_shard(ckpt: Path, name: str, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load the shard holding `name`, let fn change its tensors dict, save it and rewrite the index."""
    file = open_checkpoint(ckpt).tensors[name].file
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    index = json.loads((ckpt / INDEX_NAME).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file.name}
    index["weight_map"].update({k: file.name for k in tensors})
    (ckpt / INDEX_NAME).write_text(json.dumps(index))


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def qc(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    return lambda d: edit_json(d / CONFIG_NAME, lambda c: fn(c["quantization_config"]))


def weights(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    return qc(lambda q: fn(q["config_groups"]["group_0"]["weights"]))


def drop(*names: str) -> Callable[[Path], None]:
    return lambda d: edit_shard(d, names[0], lambda t: [t.pop(n) for n in names])


def scales(op: Callable[[torch.Tensor], torch.Tensor], rows: slice = slice(None),
           blocks: slice = slice(None)) -> Callable[[Path], None]:
    """Apply op to EXPERT's scale bytes [rows, blocks]."""
    def fn(s: torch.Tensor) -> torch.Tensor:
        s[rows, blocks] = op(s[rows, blocks])
        return s
    return lambda d: edit_tensor(d, f"{EXPERT}.weight_scale", fn)


def shift_scales(delta: int, rows: slice = slice(None), blocks: slice = slice(None)) -> Callable[[Path], None]:
    return scales(lambda s: s + delta, rows, blocks)


def swap_nibbles(d: Path) -> None:
    edit_tensor(d, f"{EXPERT}.weight_packed", lambda p: (p << 4) | (p >> 4))


def unquantize_fused_layer0(src: Path) -> Callable[[Path], None]:
    """The peers' bug: a layer's fused experts written as BF16 while the ignore list does not cover them."""
    def fn(d: Path) -> None:
        fused = {k: v for k, v in load_file(open_checkpoint(src).tensors[f"{L0}.mlp.experts.gate_up_proj"].file).items()
                 if k.startswith(f"{L0}.mlp.experts.")}
        fused |= {k: v for f in open_checkpoint(src).weight_files for k, v in load_file(f).items()
                  if k == f"{L0}.mlp.experts.down_proj"}
        def swap(t: dict[str, torch.Tensor]) -> None:
            for k in [k for k in t if k.startswith(f"{L0}.mlp.experts.")]:
                del t[k]
            t.update(fused)
        edit_shard(d, f"{EXPERT}.weight_packed", swap)
    return fn


# -------------------------------------------------------------------------------------------- good outputs

GOOD = {
    # fixture -> extra quantize flags
    "tiny_qwen35": [],
    "tiny_qwen3_moe": [],
    "tiny_qwen3_moe_fused": [],
    "tiny_mixtral": ["--rule", "even"],
    "tiny_llama": ["--preset", "mlp", "--rule", "rceil", "--max-shard-size", "100KB"],
    "tiny_llama_indivisible": ["--preset", "mlp", "--skip-indivisible", "--rule", "floor"],
}


@pytest.mark.parametrize("fixture", list(GOOD))
def test_good_outputs_pass(fixture: str, request, tmp_path: Path) -> None:
    src = request.getfixturevalue(fixture)
    run_quantize(src, tmp_path / "out", *GOOD[fixture])
    for source in (None, src):
        report = verify(tmp_path / "out", source)
        assert report.ok, report.summary()
    names = [c.name for c in report.checks]
    experts = ["experts"] if "llama" not in fixture else []  # dense models have no expert check
    assert names == ["layout", "quantization_config", "packed/scale pairs", "scale bytes", *experts,
                     "ignore coverage", "source tensors", "error bound"]
    assert ("experts" in report.summary()) == bool(experts)


def test_indivisible_kept_and_ignored(tiny_llama_indivisible, tmp_path: Path) -> None:
    run_quantize(tiny_llama_indivisible, tmp_path / "out", "--preset", "mlp", "--skip-indivisible")
    out = open_checkpoint(tmp_path / "out")
    kept = "model.layers.0.mlp.down_proj"
    assert f"{kept}.weight" in out.tensors and f"{kept}.weight_packed" not in out.tensors
    ignore_check = next(c for c in verify(tmp_path / "out").checks if c.name == "ignore coverage")
    assert ignore_check.ok and "BF16" in ignore_check.detail


# ----------------------------------------------------------------------------------------- broken outputs

# name -> (how to break the output, the check that must fail, text its failure must contain, needs --source)
BREAKS: dict[str, tuple[Callable[[Path], None], str, str, bool]] = {
    "scale byte 255": (scales(lambda s: s * 0 + 255, slice(2, 3), slice(0, 1)), "scale bytes",
                       f"{EXPERT}.weight_scale: 1 scale bytes are 255 (NaN in E8M0), first at row 2, block 0", False),
    "scale missing": (drop(f"{EXPERT}.weight_scale"), "packed/scale pairs", f"{EXPERT}.weight_packed: has no", False),
    "scale wrong shape": (lambda d: edit_shard(d, f"{EXPERT}.weight_scale", lambda t: t.update(
        {f"{EXPERT}.weight_scale": t[f"{EXPERT}.weight_scale"].repeat(1, 2)})), "packed/scale pairs", EXPERT, False),
    "expert missing": (drop(*(f"{L0}.mlp.experts.3.{p}.weight_{k}" for p in ("gate_proj", "up_proj", "down_proj")
                              for k in ("packed", "scale"))), "experts", "experts [3] missing", False),
    "index names missing shard": (lambda d: edit_json(d / INDEX_NAME, lambda i: i["weight_map"].update(
        {"extra.weight": "model-00009-of-00009.safetensors"})), "layout", "model-00009-of-00009", False),
    "index omits a tensor": (lambda d: edit_json(d / INDEX_NAME, lambda i: i["weight_map"].pop(COPIED)),
                             "layout", COPIED, False),
    "stray shard": (lambda d: shutil.copy(next(d.glob("model-*.safetensors")), d / "model-extra.safetensors"),
                    "layout", "model-extra.safetensors", False),
    "unfinished": (lambda d: (d / IN_PROGRESS_MARKER).write_text(""), "layout", "--resume", False),
    "no quantization_config": (lambda d: edit_json(d / CONFIG_NAME, lambda c: c.pop("quantization_config")),
                               "quantization_config", "no quantization_config", False),
    "num_bits 8": (weights(lambda w: w.update(num_bits=8)), "quantization_config", "num_bits", False),
    "group 16": (weights(lambda w: w.update(group_size=16)), "quantization_config", "group_size", False),
    "scale dtype e8m0": (weights(lambda w: w.update(scale_dtype="torch.float8_e8m0fnu")), "quantization_config",
                         "scale_dtype", False),
    "wrong format": (qc(lambda q: q.update(format="nvfp4-pack-quantized")), "quantization_config", "format", False),
    "unparseable scheme": (weights(lambda w: w.update(strategy="sideways")), "quantization_config",
                           "compressed-tensors rejects it", False),
    "attention not ignored": (qc(lambda q: q.update(ignore=[e for e in q["ignore"] if "self_attn" not in e])),
                              "ignore coverage", "layers.3.self_attn.q_proj: BF16 on disk but not ignored (vLLM would load it as zeros) (and 5 more", False),
    "experts ignored": (qc(lambda q: q["ignore"].append("re:.*experts.*")), "ignore coverage",
                        "experts.0.gate_proj: quantized on disk but matched by ignore", False),
    "scales 2x (+1)": (shift_scales(+1), "error bound", EXPERT, True),
    "scales 4x too small (ct 0.13 bug)": (shift_scales(-2), "error bound", EXPERT, True),
    "one block's scale -1": (shift_scales(-1, rows=slice(5, 6), blocks=slice(1, 2)), "error bound",
                             f"{EXPERT}: 1 of", True),
    "nibbles swapped": (swap_nibbles, "error bound", EXPERT, True),
    "copied tensor changed": (lambda d: edit_tensor(d, COPIED, lambda t: t * 2), "source tensors",
                              f"{COPIED}: copied bytes differ", True),
    "copied tensor dropped": (drop(COPIED), "source tensors", f"{COPIED}: neither copied nor quantized", True),
    "config changed": (lambda d: edit_json(d / CONFIG_NAME, lambda c: c.update(model_type="llama")),
                       "source tensors", "differs from the source's", True),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_broken_output_fails(case: str, broken: Path, tiny_qwen35: Path) -> None:
    fn, check_name, text, needs_source = BREAKS[case]
    fn(broken)
    report = verify(broken, tiny_qwen35 if needs_source else None)
    failed = {c.name for c in report.checks if not c.ok}
    assert check_name in failed, report.summary()
    failures = next(c for c in report.checks if c.name == check_name).failures
    assert any(text in f for f in failures), failures
    if needs_source:  # the cheap checks cannot see it: only the source comparison can
        assert verify(broken).ok


def test_fused_experts_left_in_bf16(broken: Path, tiny_qwen35: Path) -> None:
    """Peers' bug: fused experts silently not quantized and not ignored; vLLM would load zeros."""
    unquantize_fused_layer0(tiny_qwen35)(broken)
    report = verify(broken, tiny_qwen35)
    ignore = next(c for c in report.checks if c.name == "ignore coverage")
    assert any(f"{L0}.mlp.experts.0.gate_proj: BF16 on disk but not ignored" in f for f in ignore.failures), ignore
    # the bytes themselves are the source's, so only the ignore rule catches it
    assert next(c for c in report.checks if c.name == "source tensors").ok


def test_bound_follows_the_recorded_rule(tiny_qwen35: Path, tmp_path: Path) -> None:
    """A FLOOR output recorded as MSE3 fails the bound; with no recorded rule every rule's bytes pass."""
    out = tmp_path / "out"
    run_quantize(tiny_qwen35, out, "--rule", "floor")
    assert verify(out, tiny_qwen35).ok
    edit_json(out / REPORT_NAME, lambda r: r.update(rule="mse3"))
    bound = next(c for c in verify(out, tiny_qwen35).checks if c.name == "error bound")
    assert not bound.ok and "than rule mse3 gives" in bound.failures[0]
    (out / REPORT_NAME).unlink()
    report = verify(out, tiny_qwen35)
    assert report.ok and "byte-identical to rule floor/even/rceil/mse3" in report.checks[-1].detail


def test_block_error_bound_numbers() -> None:
    """Tight for the rule's own bytes, blind to tie direction, and a one-exponent scale bug exceeds it several-fold."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    blocks = w.numel() // 32
    for rule in Rule:
        q = quantize(w, rule)
        own = compare_chunk(w, q.packed, q.scales, (rule,))
        assert own.identical and own.over == 0 and own.sq_error == q.sq_error and own.blocks == blocks
        ref = block_errors(w, q.packed, q.scales)
        for delta, at_least in ((1, 10.0), (-1, 3.0)):
            shifted = (q.scales.int() + delta).to(torch.uint8)
            assert float((block_errors(w, q.packed, shifted) / ref).min()) > at_least, (rule, delta)
            assert compare_chunk(w, q.packed, shifted, (rule,)).over == blocks
    floor = quantize(w, Rule.FLOOR)
    assert compare_chunk(w, floor.packed, floor.scales, tuple(Rule)).identical  # no recorded rule: any rule's bytes
    assert compare_chunk(w, floor.packed, floor.scales, (Rule.MSE3,)).over > 0  # but not MSE3's bound
    nan = floor.scales.clone()
    nan[0, 0] = 255
    assert block_errors(w, floor.packed, nan)[0, 0] == torch.inf


def test_bound_ignores_tie_direction() -> None:
    """0.25 is as near 0 as 0.5: writing the other code of a tie is not an error (the bound is on error, not bytes)."""
    w = torch.tensor([[6.0, 0.25, 2.5] + [0.0] * 29])
    q = quantize(w, Rule.FLOOR)  # scale 2^0: 0.25 -> 0 and 2.5 -> 2 (ties to even)
    other = unpack_codes(q.packed)
    other[0, 1], other[0, 2] = 1, 5  # 0.5 and 3: the other side of each tie
    c = compare_chunk(w, pack_codes(other), q.scales, (Rule.FLOOR,))
    assert not c.identical and c.over == 0 and c.sq_error == q.sq_error
    other[0, 1] = 2  # 1.0: no longer nearest
    assert compare_chunk(w, pack_codes(other), q.scales, (Rule.FLOOR,)).over == 1


# ------------------------------------------------------------------------- the fast check and its audit

FUSED = f"{L0}.mlp.experts.gate_up_proj"  # EXPERT's source: [8, 64, 64], 1024 blocks; EXPERT is rows 64..95


def error_check(report) -> object:
    return next(c for c in report.checks if c.name == "error bound")


@pytest.mark.parametrize("bound", [Bound((Rule.MSE3,)), Bound(), Bound(depth=2)], ids=["mse3", "any rule", "imatrix"])
def test_fast_comparison_reaches_the_torch_verdict(bound: Bound) -> None:
    """compare_fast (kernel bytes, torch on the blocks they do not vouch for) = Bound.compare (torch everywhere)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=g).to(torch.bfloat16)
    q = quantize_weighted(w, torch.rand(256, generator=g) + 0.1) if bound.depth else quantize(w, Rule.MSE3)
    scales, codes = q.scales.clone(), unpack_codes(q.packed)
    scales[3, 2] += 1
    scales[7, 0] -= 2
    codes[10, 40] ^= 0x1
    codes[20, 100] ^= 0x8
    for packed, sc in ((q.packed, q.scales), (pack_codes(codes), scales)):
        fast, ran = compare_fast(w, packed, sc, bound, quantize_fast)
        slow = bound.compare(w, packed, sc)
        assert (fast.over, fast.blocks, fast.identical) == (slow.over, slow.blocks, slow.identical)
        assert fast.worst == pytest.approx(slow.worst) and fast.sq_error == pytest.approx(slow.sq_error)
        assert ran and all(torch.equal(k.packed, quantize(w, r).packed) for r, k in ran.items())
    assert slow.over >= 3  # the corruptions are caught, not just agreed on


def test_sampling_is_seeded_per_tensor() -> None:
    blocks = 10**6
    a = Sampling().blocks("a", blocks)
    assert a is not None and torch.equal(a, Sampling().blocks("a", blocks))  # reproducible
    assert not torch.equal(a, Sampling().blocks("b", blocks))  # another tensor, another sample
    assert not torch.equal(a, Sampling(seed=1).blocks("a", blocks))
    assert 900 < a.numel() <= blocks // 1024 and int(a.max()) < blocks and bool((a[1:] > a[:-1]).all())
    assert Sampling().blocks("small", 256) is None  # audited whole


def test_corrupt_block_outside_the_sample_is_caught(broken: Path, tiny_qwen35: Path) -> None:
    """The audit samples blocks, the comparison does not: a block the sample missed still fails the bound."""
    sample = Sampling().blocks(FUSED, 8 * 64 * 64 // 32)
    assert sample is not None
    row, blk = next((r, b) for r in range(32) for b in range(2) if (64 + r) * 2 + b not in set(sample.tolist()))
    shift_scales(-1, rows=slice(row, row + 1), blocks=slice(blk, blk + 1))(broken)
    check = error_check(verify(broken, tiny_qwen35))
    assert len(check.failures) == 1 and check.failures[0].startswith(f"{EXPERT}: 1 of 64 blocks have more error")
    assert "held to the torch path on" in check.detail


def broken_kernel(w: torch.Tensor, rule: Rule = Rule.MSE3) -> Quantized:
    """A systematic kernel bug: every 16th block's exponent one too large (the codes still fit it)."""
    q = quantize_fast(w, rule)
    scales = q.scales.clone()
    scales.view(-1)[5::16] += 1
    return dataclasses.replace(q, scales=scales)


def test_broken_kernel_is_caught_by_the_audit(tiny_qwen35: Path, qwen35_out: Path, tmp_path: Path,
                                              monkeypatch) -> None:
    """A kernel bug cannot vouch for itself: an output it wrote passes the fast comparison block for block, and
    only the torch audit of the sample sees it; a good output checked with it passes no bad block either."""
    monkeypatch.setattr(pipeline, "quantize_fast", broken_kernel)
    monkeypatch.setattr(verify_source, "quantize_fast", broken_kernel)
    run_quantize(tiny_qwen35, tmp_path / "out")
    check = error_check(verify(tmp_path / "out", tiny_qwen35, sampling=Sampling(min_draws=16, share=10**9)))
    assert check.failures and all("kernel's mse3 bytes differ from the torch path's" in f and "--full" in f
                                  for f in check.failures), check.failures
    assert any(f.startswith(f"{FUSED}: ") for f in check.failures)
    full = error_check(verify(tmp_path / "out", tiny_qwen35, full=True))
    assert full.failures and all("more error than rule mse3 gives" in f for f in full.failures)
    good = error_check(verify(qwen35_out, tiny_qwen35))
    assert good.failures and all("kernel's mse3 bytes differ" in f for f in good.failures)


def test_verify_written_accepts_unfinished_and_raises_on_failure(broken: Path) -> None:
    (broken / IN_PROGRESS_MARKER).write_text("")
    verify_written(broken)
    scales(lambda s: s * 0 + 255)(broken)
    with pytest.raises(QstreamError, match=r"fails verification .*weight_scale: 64 scale bytes are 255"):
        verify_written(broken)


# ------------------------------------------------------------------------------------------------ the CLI


def qstream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qstream", *args], capture_output=True, text=True,
                          env={**os.environ, "QSTREAM_DEBUG": ""})


def test_cli_exit_codes_and_output(qwen35_out: Path, broken: Path, tiny_qwen35: Path) -> None:
    good = qstream("verify", str(qwen35_out), "--source", str(tiny_qwen35))
    assert good.returncode == 0 and good.stdout.startswith(f"verify {qwen35_out} against {tiny_qwen35}: OK")
    assert "error bound" in good.stdout and "(seed 0)" in good.stdout and good.stderr == ""
    res = CliRunner().invoke(cli, ["verify", str(qwen35_out), "--source", str(tiny_qwen35), "--full", "--seed", "3"])
    assert res.exit_code == 0 and "every block re-quantized by the torch path (--full)" in res.output
    shift_scales(+1)(broken)
    bad = qstream("verify", str(broken), "--source", str(tiny_qwen35), "--json")
    assert bad.returncode == 1, bad.stderr
    data = json.loads(bad.stdout)
    assert data["ok"] is False
    assert [c["name"] for c in data["checks"] if not c["ok"]] == ["error bound"]
    usage = qstream("verify", str(broken), "--source", str(broken.parent / "nope"))
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "nope: does not exist" in usage.stderr


def test_cli_vllm_flag(qwen35_out: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "qstream.check.vllm", None)  # as if the module were absent
    res = CliRunner().invoke(cli, ["verify", str(qwen35_out), "--vllm"])
    assert res.exit_code == 2 and "cannot import qstream.check.vllm" in res.output
    verdicts = iter([True, False])
    fake = types.ModuleType("qstream.check.vllm")
    fake.check_with_vllm = lambda dst: types.SimpleNamespace(ok=(ok := next(verdicts)),
                                                             summary=lambda: f"vllm: {'OK' if ok else 'FAILED'} {dst}")
    monkeypatch.setitem(sys.modules, "qstream.check.vllm", fake)
    res = CliRunner().invoke(cli, ["verify", str(qwen35_out), "--vllm"])
    assert res.exit_code == 0 and res.output.rstrip().endswith(f"vllm: OK {qwen35_out}")
    res = CliRunner().invoke(cli, ["verify", str(qwen35_out), "--vllm", "--json"])
    assert res.exit_code == 1 and json.loads(res.output)["vllm"]["ok"] is False
