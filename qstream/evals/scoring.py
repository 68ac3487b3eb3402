"""Perplexity protocol and per-window scores: pure tensor functions, no models, no I/O.

Windows follow the Hugging Face perplexity guide: windows of `seq_len` tokens start every `stride` tokens;
a window scores only the tokens no earlier window scored, so with stride < seq_len the overlap is context
only and every token after the first is scored exactly once. With stride == seq_len (non-overlapping) the
first token of each window has no context and is not scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 1 << 25  # logits elements turned into float32 log-probs at once: bounds memory for big vocabs


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) are fed to the model; the predictions of tokens [first_target, end) are scored."""

    begin: int
    end: int
    first_target: int

    @property
    def n_scored(self) -> int:
        return self.end - self.first_target

    def logit_rows(self) -> slice:
        """Rows of the window's logits that predict its scored tokens (row i predicts token begin + i + 1)."""
        return slice(self.first_target - 1 - self.begin, self.end - 1 - self.begin)


def windows(n_tokens: int, seq_len: int, stride: int, max_windows: int | None = None) -> list[Window]:
    """The windows over a text of n_tokens; a text shorter than seq_len is one short window."""
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 2 and 1 <= stride <= seq_len, got seq_len={seq_len}, stride={stride}")
    if n_tokens < 2:
        raise ValueError(f"{n_tokens} token(s): at least 2 are needed to score one prediction")
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens or len(out) == max_windows:
            break
    return out


@dataclass
class Totals:
    """Sums over scored tokens for one model; kl and agree stay 0 for the reference model itself."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0

    def add(self, other: Totals) -> None:
        self.nll += other.nll
        self.kl += other.kl
        self.agree += other.agree
        self.tokens += other.tokens


def score(logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None = None) -> Totals:
    """NLL of targets [T] under logits [T, V]; with ref_logits [T, V], also sum of KL(ref || logits) in nats
    over the full vocabulary and the count of positions whose top-1 token is the reference's."""
    total = Totals(tokens=int(targets.numel()))
    step = max(1, CHUNK_ELEMENTS // logits.shape[-1])
    for r0 in range(0, targets.numel(), step):
        r1 = r0 + step
        logp = torch.log_softmax(logits[r0:r1].float(), dim=-1)
        total.nll -= float(logp.gather(-1, targets[r0:r1, None]).double().sum())
        if ref_logits is not None:
            ref_logp = torch.log_softmax(ref_logits[r0:r1].float(), dim=-1)
            total.kl += float((ref_logp.exp() * (ref_logp - logp)).sum(-1).double().sum())
            total.agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    return total
