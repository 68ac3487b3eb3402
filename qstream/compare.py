"""`qstream compare-rules`: what each exponent rule costs on the user's own model.

Quantizes the source once per rule (same selection), then scores the source and every
result on the same tokens: relative weight error next to perplexity, KL and top-1
agreement, so the effect of the MSE search is measured, not assumed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qstream.common import table
from qstream.evals.evaluate import EvalResult, Protocol, evaluate
from qstream.format.rules import Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.io.text_sources import Text
from qstream.planning.plan import make_plan
from qstream.planning.selection import Selection
from qstream.quantize import quantize_checkpoint

SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class RuleComparison:
    rel_errors: dict[str, float]  # rule -> relative weight error of the selected tensors
    exponent_shares: dict[str, list[float]]  # rule -> share of blocks at E = R, R-1, R-2
    result: EvalResult  # models[0] is the source, then one per rule in order

    def table(self) -> str:
        src = self.result.source
        # every quantized model is scored against the source (only the source's kl/top1 are None)
        scored = [(m, m.kl, m.top1_agree) for m in self.result.models[1:]
                  if m.kl is not None and m.top1_agree is not None]
        best = min(scored, key=lambda row: row[1])[0]
        rows = []
        for m, kl, agree in scored:
            rows.append([
                m.label + (" *" if m is best else ""), f"{self.rel_errors[m.label]:.4e}",
                "/".join(f"{100 * s:.0f}" for s in self.exponent_shares[m.label]),
                f"{m.mean_nll:.4f}", f"{m.ppl:.4f}", f"{m.ppl - src.ppl:+.4f}", f"{kl:.5f}",
                f"{100 * agree:.2f}%",
            ])
        rows.append([f"{src.label} (source)", "-", "-", f"{src.mean_nll:.4f}", f"{src.ppl:.4f}", "", "", ""])
        return table(["rule", "rel. weight error", "% blocks E=R/R-1/R-2", "Mean NLL", "Perplexity", "ΔPPL",
                      "KL", "top-1 agree"], rows)

    def as_json(self) -> dict:
        return {"rel_errors": self.rel_errors, "exponent_shares": self.exponent_shares, **self.result.as_json()}

    @staticmethod
    def of(reports: Mapping[str, dict], result: EvalResult) -> RuleComparison:
        """From each rule's quantize report (rule -> report) and an evaluation whose models[1:] are labelled by
        rule: the demo builds it from checkpoints and scores it has already made, without redoing either."""
        return RuleComparison({r: rep["totals"]["rel_error"] for r, rep in reports.items()},
                              {r: exponent_shares(rep) for r, rep in reports.items()}, result)


def exponent_shares(report: dict) -> list[float]:
    """Share of all quantized blocks whose exponent is RCEIL's R, R-1, R-2, from a quantize report."""
    blocks = [0.0, 0.0, 0.0]
    for t in report["tensors"]:
        numel = math.prod(t["shape"])
        blocks = [b + numel * t["exponent_share"][f"R-{i}"] for i, b in enumerate(blocks)]
    total = sum(blocks) or 1.0
    return [b / total for b in blocks]


def compare_rules(src: Path, workdir: Path, selection: Selection, rules: list[Rule], text: Text,
                  protocol: Protocol, device: str = "auto", progress: bool = True) -> RuleComparison:
    """Quantize src once per rule into workdir/<name>-<rule>, then evaluate all on the same tokens."""
    src, workdir = Path(src), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = open_checkpoint(src)
    reports, outs = {}, []
    for rule in rules:
        dst = workdir / f"{src.name}-mxfp4-{rule.value}"
        reports[rule.value] = quantize_checkpoint(make_plan(ckpt, selection, rule, SHARD_BYTES), dst, device=device,
                                                  overwrite=True, progress=progress and sys.stderr.isatty())
        outs.append(dst)
    result = evaluate(src, outs, text, protocol, labels=[src.name, *(r.value for r in rules)], progress=progress)
    return RuleComparison.of(reports, result)
