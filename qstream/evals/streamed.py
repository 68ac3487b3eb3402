"""Eval's scores on the streaming engine (qstream.engine): one part of one model in memory at a time,
whatever the model's size.

The source runs first, window by window through every layer (qstream.engine.run); its last hidden states wait
in a HiddenStore (in memory or spilled to a file). Each quantized checkpoint then runs the same windows, and
both heads (final norm + lm_head) turn both stores into logits a few rows at a time, so KL and top-1 agreement
are computed from the two full-vocabulary distributions without ever holding tokens x vocab numbers.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from qstream.engine.hidden import DEFAULT_BUDGET, HiddenStore
from qstream.engine.model import HEAD, StreamedModel
from qstream.engine.run import DEFAULT_BATCH_TOKENS, Job, run
from qstream.errors import QstreamError
from qstream.evals.scoring import CHUNK_ELEMENTS, Totals, Window, score


def _rows(job: Job, k: int, w: Window, step: int) -> list[tuple[int, int, int]]:
    """(store row, first target token, count) chunks of window k's scoring rows."""
    rows = w.logit_rows()
    base = job.offsets[k]
    return [(base + r, w.first_target + r - rows.start, min(step, rows.stop - r))
            for r in range(rows.start, rows.stop, step)]


@torch.inference_mode()
def score_windows(paths: Sequence[Path], ids: torch.Tensor, wins: Sequence[Window], dtype: torch.dtype,
                  device: torch.device, progress: bool = False, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                  hidden_budget: int = DEFAULT_BUDGET, spill_dir: Path | None = None,
                  scored: Callable[[int, Totals, float], None] | None = None) -> tuple[list[Totals], list[float]]:
    """Totals and seconds per model (paths[0] the source) over windows `wins` of token ids `ids`; `scored(i,
    totals, seconds)` is called as model i is done (for progress lines). Batches run in turn on torch's
    threads: a few windows make too few batches to spread over the cores."""
    job = Job(ids, tuple((w.begin, w.end) for w in wins))
    totals = [Totals() for _ in paths]
    seconds = [0.0] * len(paths)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qstream-eval-", dir=spill_dir)))
        src = stack.enter_context(StreamedModel(paths[0], dtype, device))
        if int(ids.max()) >= src.vocab_size:
            raise QstreamError(f"{paths[0]}: its tokenizer yields id {int(ids.max())}, beyond the model's "
                               f"{src.vocab_size} embeddings; the tokenizer does not belong to this model")
        step = max(1, CHUNK_ELEMENTS // src.output_vocab)
        src_store = stack.enter_context(HiddenStore(job.tokens, src.hidden_size, dtype, hidden_budget, tmp))
        t0 = time.perf_counter()
        run(src, job, src_store, batch_tokens=batch_tokens, progress=progress, workers=1)
        with src.loaded(HEAD):
            for k, w in enumerate(wins):
                for r0, tgt, n in _rows(job, k, w, step):
                    logits = src.logits(src_store.read(r0, r0 + n).to(device))
                    totals[0].add(score(logits, ids[tgt:tgt + n].to(device)))
        seconds[0] = time.perf_counter() - t0
        if scored is not None:
            scored(0, totals[0], seconds[0])
        for i, path in enumerate(paths[1:], 1):
            t0 = time.perf_counter()
            with StreamedModel(path, dtype, device) as model, \
                    HiddenStore(job.tokens, model.hidden_size, dtype, hidden_budget, tmp) as store:
                if model.output_vocab != src.output_vocab or int(ids.max()) >= model.vocab_size:
                    raise QstreamError(f"{path}: vocabulary of {model.output_vocab} logits, the source has "
                                       f"{src.output_vocab}; compare only checkpoints of the same model")
                run(model, job, store, batch_tokens=batch_tokens, progress=progress, workers=1)
                with src.loaded(HEAD), model.loaded(HEAD):
                    for k, w in enumerate(wins):
                        for r0, tgt, n in _rows(job, k, w, step):
                            ref = src.logits(src_store.read(r0, r0 + n).to(device))
                            logits = model.logits(store.read(r0, r0 + n).to(device))
                            totals[i].add(score(logits, ids[tgt:tgt + n].to(device), ref))
            seconds[i] = time.perf_counter() - t0
            if scored is not None:
                scored(i, totals[i], seconds[i])
    return totals, seconds
