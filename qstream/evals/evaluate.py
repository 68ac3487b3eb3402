"""Perplexity of a source checkpoint and of quantized ones on the same tokens, with KL and top-1 agreement.

One protocol for every model: the source's tokenizer encodes the text as one sequence (no BOS or other special
tokens added), the token stream is cut into windows (qstream.evals.scoring), and every model sees exactly the
same windows (with --max-windows only the prefix of the text they need is tokenized, into the ids the whole
text would give: see qstream.io.tokens). The models run on the layer-streaming engine (qstream.evals.streamed),
one decoder layer of one model in memory at a time (MXFP4 and FP8 weights decoded as they load, see
qstream.engine.weights): the source's last hidden states are kept, and the KL of a quantized model's next-token
distribution from the source's is computed from both heads' logits a few rows at a time, with no cache of
source log-probs (which would take tokens x vocab floats).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from qstream.common import EVAL_NAME, EVAL_SCHEMA, resolve_device, table
from qstream.errors import QstreamError
from qstream.evals.scoring import Totals, windows
from qstream.io.text_sources import Text
from qstream.io.tokens import tokenize

BOS_HANDLING = "none added: the whole text is tokenized once with add_special_tokens=False"
KL_DEFINITION = "mean over scored tokens of KL(source || model) of next-token distributions, nats, full vocabulary"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Protocol:
    """How text becomes scored tokens. stride None = seq_len (non-overlapping); dtype auto = float32 on CPU,
    bfloat16 on CUDA."""

    seq_len: int = 2048
    stride: int | None = None
    max_windows: int | None = None
    dtype: str = "auto"
    device: str = "auto"


@dataclass(frozen=True)
class ModelResult:
    """One model's numbers; kl and top1_agree are None for the source, against which they are measured."""

    label: str
    path: str
    mean_nll: float
    ppl: float
    kl: float | None
    top1_agree: float | None
    tokens: int  # tokens scored
    seconds: float  # time in this model's forward passes and scoring

    @staticmethod
    def from_totals(label: str, path: Path, t: Totals, seconds: float, is_source: bool) -> ModelResult:
        mean_nll = t.nll / t.tokens
        return ModelResult(label, str(path), mean_nll, math.exp(mean_nll), None if is_source else t.kl / t.tokens,
                           None if is_source else t.agree / t.tokens, t.tokens, seconds)


@dataclass(frozen=True)
class EvalResult:
    protocol: dict
    models: list[ModelResult] = field(default_factory=list)  # the source first

    @property
    def source(self) -> ModelResult:
        return self.models[0]

    def as_json(self) -> dict:
        return {"schema": EVAL_SCHEMA, "qstream_version": __import__("qstream").__version__,
                "protocol": self.protocol, "models": [asdict(m) for m in self.models]}

    def table(self) -> str:
        """Model | Mean NLL | Perplexity | ΔPPL | KL | top-1 agree, markdown-compatible."""
        src = self.source
        rows = [[m.label, f"{m.mean_nll:.4f}", f"{m.ppl:.4f}",
                 "" if m is src else f"{m.ppl - src.ppl:+.4f} ({100 * (m.ppl / src.ppl - 1):+.2f}%)",
                 "" if m.kl is None else f"{m.kl:.5f}",
                 "" if m.top1_agree is None else f"{100 * m.top1_agree:.2f}%"] for m in self.models]
        return table(["Model", "Mean NLL", "Perplexity", "ΔPPL", "KL", "top-1 agree"], rows)

    def protocol_text(self) -> str:
        p = self.protocol
        short = " (text shorter than one window: one short window)" if p["short_text"] else ""
        count = (f"{p['tokens_in_text']:,} tokens" if p["tokens_in_text"] is not None else
                 f"its first {p['tokens_tokenized']:,} tokens tokenized (what the windows need)")
        return (f"text: {_text_name(p['text'])}, {count}; seq_len {p['seq_len']}, "
                f"stride {p['stride']}, {p['windows']} window(s), {p['tokens_scored']:,} tokens scored{short}; "
                f"BOS {p['bos']}; {p['dtype']} on {p['device']}")


def _text_name(t: dict) -> str:
    where = {"file": lambda: t["path"], "wikipedia": lambda: f"Wikipedia leads ({t['package']})",
             "hf-cache": lambda: f"{t['dataset']}/{t['config']} {t['split']} (HF datasets cache)"}
    return where[t["kind"]]()


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise QstreamError(f"dtype {dtype!r} not supported; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _log(msg: str) -> None:
    """A progress line on stderr, for logs (on a terminal the bar does this job)."""
    print(msg, file=sys.stderr, flush=True)


def evaluate(source: Path, quantized: Sequence[Path], text: Text, protocol: Protocol = Protocol(),
             labels: Sequence[str] | None = None, progress: bool = True) -> EvalResult:
    """Score source and every checkpoint in `quantized` on the same windows of `text` (see module doc)."""
    from qstream.evals.streamed import score_windows

    paths = [Path(source), *map(Path, quantized)]
    labels = list(labels) if labels is not None else [p.resolve().name for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} models")
    device = resolve_device(protocol.device)
    dtype = resolve_dtype(protocol.dtype, device)
    stride = protocol.stride or protocol.seq_len
    if protocol.seq_len < 2 or not 1 <= stride <= protocol.seq_len:
        raise QstreamError(f"--seq-len {protocol.seq_len} / --stride {stride}: need seq_len >= 2 and "
                           "1 <= stride <= seq_len")
    if protocol.max_windows is not None and protocol.max_windows < 1:
        raise QstreamError(f"--max-windows {protocol.max_windows}: must be at least 1")
    needed = None if protocol.max_windows is None else (protocol.max_windows - 1) * stride + protocol.seq_len
    ids, whole = tokenize(paths[0], text, needed)
    try:
        wins = windows(ids.numel(), protocol.seq_len, stride, protocol.max_windows)
    except ValueError as exc:  # the protocol is checked above: only a text of under 2 tokens gets here
        raise QstreamError(f"{_text_name(text.source)}: {exc}") from None
    bar_on_tty = progress and sys.stderr.isatty()
    if progress and not bar_on_tty:
        _log(f"eval: {len(paths)} model(s) to score on {len(wins)} window(s) of {protocol.seq_len} tokens, "
             "one decoder layer at a time")
    ids_sha256 = hashlib.sha256(ids[:wins[-1].end].numpy().tobytes()).hexdigest()  # what the windows cover
    scored = sum(w.n_scored for w in wins)

    def done(i: int, t: Totals, s: float) -> None:
        """A line as each model is scored: on a big model that is hours apart."""
        if progress:
            _log(f"scored {labels[i]}: {t.tokens:,} tokens in {s:.1f} s ({t.tokens / s:.0f} tokens/s), "
                 f"PPL {math.exp(t.nll / t.tokens):.4f}")

    totals, seconds = score_windows(paths, ids, wins, dtype, device, bar_on_tty, scored=done)
    proto = {
        "text": text.describe(), "tokenizer": str(paths[0]), "bos": BOS_HANDLING,
        "tokens_in_text": int(ids.numel()) if whole else None, "tokens_tokenized": int(ids.numel()),
        "token_ids_sha256": ids_sha256, "seq_len": protocol.seq_len, "stride": stride,
        "max_windows": protocol.max_windows, "windows": len(wins), "tokens_scored": scored,
        "short_text": ids.numel() < protocol.seq_len, "dtype": str(dtype).removeprefix("torch."),
        "device": device.type, "kl": KL_DEFINITION,
    }
    results = [ModelResult.from_totals(lab, p, t, s, i == 0)
               for i, (lab, p, t, s) in enumerate(zip(labels, paths, totals, seconds, strict=True))]
    return EvalResult(proto, results)


def save_into(result: EvalResult, dst: Path) -> Path:
    """Write DST/qstream_eval.json: the protocol, the source's row and DST's own row (DST must be one of the
    evaluated quantized checkpoints), so a model card can quote measurements stored with the checkpoint."""
    dst = Path(dst)
    row = next((m for m in result.models[1:] if Path(m.path).resolve() == dst.resolve()), None)
    if row is None:
        raise QstreamError(f"{dst}: not among the evaluated checkpoints; pass it as one of the QUANTIZED arguments")
    data = {**result.as_json(), "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": asdict(result.source), "model": asdict(row)}
    del data["models"]
    out = dst / EVAL_NAME
    tmp = dst / f".{EVAL_NAME}.partial"
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise QstreamError(f"{out}: cannot write ({exc.strerror}); is {dst} writable?") from None
    return out
