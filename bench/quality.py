"""Quality of quantized checkpoints against their source, per window, for the benches that compare methods.

Every model is loaded whole in float32 on CPU (the bench models are small), every window of the token stream
scored with qstream.evals.scoring.score, the quantized ones against the source's logits; per-window totals give
the paired z of a KL difference.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from qstream.evals.models import load_model
from qstream.evals.scoring import Totals, score, windows


def score_cases(src: Path, cases: list[Path], ids: torch.Tensor, seq_len: int, n_windows: int
                ) -> tuple[list[Totals], list[list[Totals]]]:
    """(the source's per-window totals, each case's per-window totals against the source) on the first
    `n_windows` non-overlapping windows of `seq_len` tokens of `ids`."""
    cpu = torch.device("cpu")
    wins = windows(ids.numel(), seq_len, seq_len, n_windows)
    source = load_model(src, torch.float32, cpu)
    models = [load_model(c, torch.float32, cpu) for c in cases]
    src_totals: list[Totals] = []
    per_case: list[list[Totals]] = [[] for _ in cases]
    with torch.inference_mode():
        for i, w in enumerate(wins):
            targets = ids[w.first_target:w.end]
            ref = source(input_ids=ids[None, w.begin:w.end], use_cache=False).logits[0, w.logit_rows()]
            src_totals.append(score(ref, targets))
            for out, model in zip(per_case, models, strict=True):
                logits = model(input_ids=ids[None, w.begin:w.end], use_cache=False).logits[0, w.logit_rows()]
                out.append(score(logits, targets, ref))
            print(f"  window {i + 1}/{len(wins)}", file=sys.stderr, flush=True)
    return src_totals, per_case


def summed(ts: list[Totals]) -> Totals:
    out = Totals()
    for t in ts:
        out.add(t)
    return out


def paired_z(base: list[Totals], other: list[Totals]) -> tuple[float, float]:
    """(mean over windows of KL_base - KL_other per token, its z = mean / standard error); positive: `other`
    is closer to the source."""
    d = torch.tensor([b.kl / b.tokens - o.kl / o.tokens for b, o in zip(base, other, strict=True)], dtype=torch.float64)
    se = float(d.std(unbiased=True)) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean()) / se if se > 0 else math.inf
