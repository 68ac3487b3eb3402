"""Perplexity of a source checkpoint and of quantized ones on the same tokens, with KL and top-1 agreement.

One protocol for every model: the source's tokenizer encodes the text as one sequence (no BOS or other special
tokens added), the token stream is cut into windows (qstream.evals.scoring), and every model sees exactly the
same windows (with --max-windows only the prefix of the text they need is tokenized, into the ids the whole
text would give: see `tokenize`). All models are held at once (the source plus each checkpoint to compare; MXFP4
weights decoded as they load, see qstream.evals.models), and each window runs through every model in turn, so the KL of
a quantized model's next-token distribution from the source's is computed on the spot from both logits,
with no cache of source log-probs (which would take tokens x vocab floats).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
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
# Tokenizing a prefix of the text: a token is the whole text's once it ends this many characters before the cut.
# Fast tokenizers split text into pre-tokens (words, digit runs, whitespace runs) by rules that look a few
# characters ahead, and BPE/Unigram work inside one pre-token, so cutting the text changes only the pre-token
# at the cut; no pre-token of real text spans 1024 characters.
PREFIX_MARGIN_CHARS = 1024
CHARS_PER_TOKEN_GUESS = 6  # first prefix length per token wanted (English: about 4.5); too short costs one more round


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


def load_tokenizer(tokenizer_dir: Path):
    """The checkpoint's tokenizer, or a one-line error naming the directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise QstreamError(f"{tokenizer_dir}: no usable tokenizer ({str(exc).splitlines()[0]}); "
                           "copy the base model's tokenizer files into it") from None


def settled_ids(tok, text: str, chars: int) -> list[int]:
    """The ids of text[:chars] that end PREFIX_MARGIN_CHARS or more before the cut: the whole text's first ids."""
    enc = tok(text[:chars], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    limit = chars - PREFIX_MARGIN_CHARS
    n = next((i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > limit), len(enc["input_ids"]))
    return enc["input_ids"][:n]


def tokenize(tokenizer_dir: Path, text: Text, max_tokens: int | None = None) -> tuple[torch.Tensor, bool]:
    """(ids, whole): the text's token ids as the whole text tokenized once with no special tokens gives them,
    and whether the whole text was tokenized. With max_tokens, a fast tokenizer encodes growing prefixes of the
    text until max_tokens ids are settled (see settled_ids), and returns those: a few windows of a large corpus
    cost milliseconds, not minutes and gigabytes."""
    tok = load_tokenizer(tokenizer_dir)
    if max_tokens is not None and tok.is_fast:  # slow tokenizers give no offsets: they take the whole text
        chars = max_tokens * CHARS_PER_TOKEN_GUESS + PREFIX_MARGIN_CHARS
        while chars < len(text.text):
            ids = settled_ids(tok, text.text, chars)
            if len(ids) >= max_tokens:
                return torch.tensor(ids[:max_tokens], dtype=torch.long), False
            chars *= 2
    ids = tok(text.text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long), True


def _log(msg: str) -> None:
    """A progress line on stderr, for logs (on a terminal the bar does this job)."""
    print(msg, file=sys.stderr, flush=True)


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
    needed = None if protocol.max_windows is None else (protocol.max_windows - 1) * stride + protocol.seq_len
    ids, whole = tokenize(paths[0], text, needed)
    try:
        wins = windows(ids.numel(), protocol.seq_len, stride, protocol.max_windows)
    except ValueError as exc:  # the protocol is checked above: only a text of under 2 tokens gets here
        raise QstreamError(f"{_text_name(text.source)}: {exc}") from None
    bar_on_tty = progress and sys.stderr.isatty()
    if progress and not bar_on_tty:
        _log(f"eval: loading {len(paths)} model(s) to score {len(wins)} window(s) of {protocol.seq_len} tokens")
    models = [load_model(p, dtype, device) for p in paths]
    vocab_limit = min(m.get_input_embeddings().num_embeddings for m in models)
    if int(ids.max()) >= vocab_limit:
        raise QstreamError(f"{paths[0]}: its tokenizer yields id {int(ids.max())}, beyond a model's "
                           f"{vocab_limit} embeddings; the tokenizer does not belong to these models")
    ids_sha256 = hashlib.sha256(ids[:wins[-1].end].numpy().tobytes()).hexdigest()  # what the windows cover
    ids = ids.to(device)
    totals = [Totals() for _ in paths]
    seconds = [0.0] * len(paths)
    scored = sum(w.n_scored for w in wins)
    with torch.inference_mode(), tqdm(total=scored, unit="tok", unit_scale=True, desc="eval",
                                      disable=not bar_on_tty, dynamic_ncols=True) as bar:
        for k, w in enumerate(wins, 1):
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
            ppl = math.exp(totals[0].nll / totals[0].tokens)
            bar.set_postfix(ppl=f"{ppl:.3f}")
            if progress and not bar_on_tty:
                _log(f"eval: window {k}/{len(wins)}, {totals[0].tokens:,}/{scored:,} tokens, "
                     f"{labels[0]} PPL {ppl:.3f}, "
                     f"{totals[0].tokens * len(paths) / sum(seconds):.0f} tokens/s over {len(paths)} model(s)")
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
    if progress:
        for r in results:
            _log(f"scored {r.label}: {r.tokens:,} tokens in {r.seconds:.1f} s ({r.tokens / r.seconds:.0f} tokens/s), "
                 f"PPL {r.ppl:.4f}")
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
