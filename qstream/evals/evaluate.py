"""Perplexity of a source checkpoint and of quantized ones on the same tokens, with KL and top-1 agreement.

One protocol for every model: the source's tokenizer encodes the whole text once (no BOS or other special
tokens added), the token stream is cut into windows (qstream.evals.scoring), and every model sees exactly the
same windows. All models are held at once (the source plus each checkpoint to compare; MXFP4 weights
decoded as they load, see qstream.evals.models), and each window runs through every model in turn, so the KL of
a quantized model's next-token distribution from the source's is computed on the spot from both logits,
with no cache of source log-probs (which would take tokens x vocab floats).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from tqdm import tqdm

from qstream.common import EVAL_NAME, EVAL_SCHEMA, resolve_device, table
from qstream.errors import QstreamError
from qstream.evals.scoring import Totals, Window, score, windows
from qstream.evals.text_sources import Text

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
        return (f"text: {_text_name(p['text'])}, {p['tokens_in_text']:,} tokens; seq_len {p['seq_len']}, "
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


def tokenize(tokenizer_dir: Path, text: Text) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids, no special tokens added."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise QstreamError(f"{tokenizer_dir}: no usable tokenizer ({str(exc).splitlines()[0]}); "
                           "copy the base model's tokenizer files into it") from None
    ids = tok(text.text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _window_logits(model, ids: torch.Tensor, w: Window, vocab: int | None, path: Path) -> torch.Tensor:
    logits = model(input_ids=ids[None, w.begin:w.end], use_cache=False).logits[0, w.logit_rows()]
    if vocab is not None and logits.shape[-1] != vocab:
        raise QstreamError(f"{path}: vocabulary of {logits.shape[-1]} logits, the source has {vocab}; "
                           "compare only checkpoints of the same model")
    return logits


def evaluate(source: Path, quantized: Sequence[Path], text: Text, protocol: Protocol = Protocol(),
             labels: Sequence[str] | None = None, progress: bool = True) -> EvalResult:
    """Score source and every checkpoint in `quantized` on the same windows of `text` (see module doc)."""
    from qstream.evals.models import load_model

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
    ids = tokenize(paths[0], text)
    try:
        wins = windows(ids.numel(), protocol.seq_len, stride, protocol.max_windows)
    except ValueError as exc:  # the protocol is checked above: only a text of under 2 tokens gets here
        raise QstreamError(f"{_text_name(text.source)}: {exc}") from None
    models = [load_model(p, dtype, device) for p in paths]
    vocab_limit = min(m.get_input_embeddings().num_embeddings for m in models)
    if int(ids.max()) >= vocab_limit:
        raise QstreamError(f"{paths[0]}: its tokenizer yields id {int(ids.max())}, beyond a model's "
                           f"{vocab_limit} embeddings; the tokenizer does not belong to these models")
    ids = ids.to(device)
    totals = [Totals() for _ in paths]
    seconds = [0.0] * len(paths)
    scored = sum(w.n_scored for w in wins)
    with torch.inference_mode(), tqdm(total=scored, unit="tok", unit_scale=True, desc="eval",
                                      disable=not progress, dynamic_ncols=True) as bar:
        for w in wins:
            targets = ids[w.first_target:w.end]
            ref = None
            for i, (model, path) in enumerate(zip(models, paths, strict=True)):
                t0 = time.perf_counter()
                logits = _window_logits(model, ids, w, None if ref is None else ref.shape[-1], path)
                totals[i].add(score(logits, targets, ref))
                if i == 0:
                    ref = logits
                seconds[i] += time.perf_counter() - t0
            bar.update(w.n_scored)
            bar.set_postfix(ppl=f"{math.exp(totals[0].nll / totals[0].tokens):.3f}")
    proto = {
        "text": text.describe(), "tokenizer": str(paths[0]), "bos": BOS_HANDLING,
        "tokens_in_text": int(ids.numel()), "seq_len": protocol.seq_len, "stride": stride,
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
