"""The model card carries the checkpoint's real numbers: sizes from its tensors, the selection
actually made, the weight error from the report, and the measured perplexity/KL."""

from __future__ import annotations

import json
import re
import math
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from qstream.io.checkpoint import open_checkpoint
from qstream.format.rules import Rule
from qstream.quantize import quantize_checkpoint
from qstream.planning.plan import make_plan
from qstream.planning.selection import Selection
from tests.test_evaluate import PROSE, lm  # noqa: F401 - lm is a fixture


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
    assert f"{total / 1e6:.3g}M total, {active / 1e6:.3g}M active per token" in card
    assert f"{cfg['num_experts']} experts, {cfg['num_experts_per_tok']} routed per token + 1 shared" in card
    assert re.search(rf"\| language routed expert +\| MXFP4 +\| {routed / 1e6:.3g}M ", card)
    assert "| Base model           | Qwen/Qwen3.5-tiny" in card
    assert "| mtp routed expert" in card and "| visual other" in card  # kept components are listed too
    assert f"relative weight error sum((Wq-W)^2)/sum(W^2) = {report['totals']['rel_error']:.3e}" in card
    assert all(f"  - `{e}`" in card for e in report["ignore"])
    assert f"vllm serve ./{dst.name}" in card and "Not measured yet" in card


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
