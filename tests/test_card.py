"""The model card carries the checkpoint's real numbers: sizes from its tensors, the selection
actually made, the weight error from the report, and the measured perplexity/KL."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from qstream.common import REPORT_NAME, human_bytes
from qstream.evals.evaluate import Protocol, evaluate, save_into
from qstream.format.rules import Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.io.text_sources import from_file
from qstream.planning.plan import make_plan
from qstream.planning.selection import Selection
from qstream.quantize import quantize_checkpoint
from qstream.report.card import human_count, write_card
from tests.fixtures import assert_same_bytes
from tests.test_evaluate import CPU32, PROSE, lm  # noqa: F401 - lm is a fixture


def source_counts(src: Path) -> tuple[int, int, int]:
    """(all parameters, language-model parameters, routed-expert parameters) from the source's headers."""
    total = language = routed = 0
    for f in src.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                n = math.prod(h.get_slice(k).get_shape())
                total += n
                if not k.startswith(("model.visual.", "mtp.")):
                    language += n
                    routed += n if ".mlp.experts." in k else 0
    return total, language, routed


def test_card_after_quantize(tmp_path, tiny_qwen35) -> None:
    src = tmp_path / "Qwen3.5-tiny"
    shutil.copytree(tiny_qwen35, src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: Qwen/Qwen3.5-tiny\n---\n# upstream card\n")
    dst = tmp_path / "Qwen3.5-tiny-MXFP4"
    report = quantize_checkpoint(make_plan(open_checkpoint(src), Selection(), Rule.MSE3, 10**9), dst, device="cpu", progress=False)
    card = (dst / "README.md").read_text()
    cfg = json.loads((src / "config.json").read_text())["text_config"]
    total, language, routed = source_counts(src)
    active = language - routed + routed * cfg["num_experts_per_tok"] // cfg["num_experts"]
    assert card.startswith("---\nlicense: apache-2.0\nbase_model: Qwen/Qwen3.5-tiny\n")
    assert "# Qwen3.5-tiny-MXFP4" in card and "upstream card" not in card
    assert "`Qwen3_5MoeForConditionalGeneration` (qwen3_5_moe)" in card
    assert f"{human_count(total)} total, {human_count(active)} active per token (language model; computed from " \
           "tensor shapes and the router's top-k)" in card
    assert f"{cfg['num_experts']} experts, {cfg['num_experts_per_tok']} routed per token + 1 shared" in card
    assert re.search(rf"\| language routed expert +\| MXFP4 +\| {human_count(routed)} ", card)
    assert "| Base model           | Qwen/Qwen3.5-tiny" in card
    assert "| mtp routed expert" in card and "| visual other" in card  # kept components are listed too
    assert f"relative weight error sum((Wq-W)^2)/sum(W^2) = {report['totals']['rel_error']:.3e}" in card
    assert all(f"  - `{e}`" in card for e in report["ignore"])
    assert f"vllm serve ./{dst.name}" in card and "Not measured yet" in card
    assert not re.search(r"\b0\.\d+[KMB]\b", card)  # 742K, never 0.742M


def test_card_quality_table_from_eval(lm, tmp_path) -> None:  # noqa: F811 - the fixture
    src, quantized = lm
    dst = tmp_path / "q"
    shutil.copytree(quantized, dst)
    text = tmp_path / "eval.txt"
    text.write_text(PROSE)
    r = subprocess.run([sys.executable, "-m", "qstream", "eval", str(src), str(dst), "--seq-len", "128",
                        "--max-windows", "3", "--text-file", str(text), "--card", str(dst)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    saved = json.loads((dst / "qstream_eval.json").read_text())
    card = (dst / "README.md").read_text()
    s, m = saved["source"], saved["model"]
    for number in (f"{s['ppl']:.4f}", f"{m['ppl']:.4f}", f"{m['mean_nll']:.4f}", f"{m['kl']:.5f}",
                   f"{100 * m['top1_agree']:.2f}%", f"{saved['protocol']['tokens_scored']:,} tokens scored"):
        assert number in card, number
    assert "Not measured yet" not in card


def test_human_count() -> None:
    cases = {0: "0", 999: "999", 1_234: "1.23K", 69_100: "69.1K", 742_000: "742K", 999_499: "999K",
             999_950: "1M", 135_000_000: "135M", 35_951_000_000: "36B", 1_000_000_000_000: "1T"}
    assert {n: human_count(n) for n in cases} == cases


def test_card_holds_no_times_or_memory(lm, tmp_path) -> None:  # noqa: F811 - the fixture
    """The card reads the same whatever the run's time, memory or date: those stay in the report and the
    eval json. Rewriting them there and re-rendering gives the same bytes."""
    src, quantized = lm
    dst = tmp_path / "q"
    shutil.copytree(quantized, dst)
    report = json.loads((dst / REPORT_NAME).read_text())
    text = tmp_path / "eval.txt"
    text.write_text(PROSE)
    save_into(evaluate(src, [dst], from_file(text), Protocol(seq_len=64, max_windows=2, **CPU32), progress=False), dst)
    card = write_card(dst, src / "README.md").read_bytes()
    t = report["totals"]
    for gone in ("RSS", "peak", " s (", human_bytes(t["peak_rss_bytes"]), "Measured 2", str(text), str(tmp_path)):
        assert gone not in card.decode(), gone
    saved = json.loads((dst / "qstream_eval.json").read_text())
    saved["created"] = "1999-01-01T00:00:00+00:00"
    saved["source"]["seconds"] = saved["model"]["seconds"] = 12345.0
    (dst / "qstream_eval.json").write_text(json.dumps(saved))
    report["totals"].update(seconds=98765.4, peak_rss_bytes=7 * 2**40, stages={"quantize": 98000.0})
    (dst / REPORT_NAME).write_text(json.dumps(report))
    assert_same_bytes(write_card(dst, src / "README.md").read_bytes(), card, "the card after new times")


def test_dense_card_has_no_router_and_small_counts(lm) -> None:  # noqa: F811 - the fixture
    """A dense model's card speaks of no router or experts, and counts under a million read as thousands."""
    src, q = lm
    card = (q / "README.md").read_text()
    total = sum(math.prod(s) for s in _shapes(src))
    assert total < 10**6
    assert f"| Parameters           | {human_count(total)} total, {human_count(total)} active per token " \
           "(language model, dense: no routing" in card
    assert "| Experts              | dense" in card
    assert "router" not in card and "top-k" not in card and not re.search(r"\b0\.\d+M\b", card)


def _shapes(ckpt: Path) -> list[list[int]]:
    shapes = []
    for f in ckpt.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            shapes += [h.get_slice(k).get_shape() for k in h.keys()]
    return shapes


def test_quality_rows_are_labelled_once(lm, tmp_path) -> None:  # noqa: F811 - the fixture
    """Labels that carry their own parenthesis (as the demo's do) are not given a second one."""
    src, quantized = lm
    dst = tmp_path / "q"
    shutil.copytree(quantized, dst)
    text = tmp_path / "eval.txt"
    text.write_text(PROSE)
    result = evaluate(src, [dst], from_file(text), Protocol(seq_len=64, max_windows=2, **CPU32),
                      labels=["MoE bf16", "MoE MXFP4 (experts)"], progress=False)
    save_into(result, dst)
    card = write_card(dst, src / "README.md").read_text()
    assert re.search(r"^\| source +\| MoE bf16 +\| ", card, re.M)
    assert re.search(r"^\| this checkpoint +\| MoE MXFP4 \(experts\) +\| ", card, re.M)
    assert ") (" not in card


def test_unmeasured_card_gives_a_command_that_measures(lm, tmp_path) -> None:  # noqa: F811 - the fixture
    """The card of a fresh checkpoint names the real eval command (`--card`, real relative paths); run as
    given from the checkpoint's directory (plus a short text), it fills the card's quality table."""
    src, quantized = lm
    home = tmp_path / "models"
    home.mkdir()
    shutil.copytree(src, home / "Llama-tiny")
    dst = home / "Llama-tiny-MXFP4"
    quantize_checkpoint(make_plan(open_checkpoint(home / "Llama-tiny"), Selection("mlp"), Rule.MSE3, 10**9), dst, device="cpu",
        progress=False)
    card = (dst / "README.md").read_text()
    command = "qstream eval ./Llama-tiny ./Llama-tiny-MXFP4 --card ./Llama-tiny-MXFP4"
    assert f"Not measured yet. Run `{command}`" in card
    assert "SOURCE" not in card and "--save-into" not in card and str(tmp_path) not in card
    text = tmp_path / "eval.txt"
    text.write_text(PROSE)
    args = shlex.split(command)[1:] + ["--text-file", str(text), "--seq-len", "64", "--max-windows", "2"]
    r = subprocess.run([sys.executable, "-m", "qstream", *args], cwd=home, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    card = (dst / "README.md").read_text()
    assert "Not measured yet" not in card and "| this checkpoint | Llama-tiny-MXFP4 |" in card


def test_source_provenance_is_carried(tiny_llama, tmp_path) -> None:
    """A caveat about the source's weights (the SmolLM2 builds: dequantized from a Q4_1 GGUF) holds for the
    quantized checkpoint too: its card repeats the source card's Provenance section, and nothing else of it."""
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    note = "Weights were Q4_1 in the GGUF they come from, dequantized to bf16 here."
    (src / "README.md").write_text(f"---\nlicense: mit\n---\n\n# src\n\nIntro.\n\n## Provenance\n\n{note}\n\n"
                                   "## Usage\n\nupstream usage\n")
    dst = tmp_path / "q"
    quantize_checkpoint(make_plan(open_checkpoint(src), Selection("mlp"), Rule.MSE3, 10**9), dst, device="cpu", progress=False)
    card = (dst / "README.md").read_text()
    assert f"## Provenance\n\nFrom the source's card (it holds for these weights too):\n\n{note}\n\n## Quality" in card
    assert "upstream usage" not in card and "Intro." not in card
