"""Every token of a job through a StreamedModel, one part (embeddings, then each decoder layer) at a time.

The job's sequences are independent (one causal mask each) and run in batches of equal-length sequences.
With several workers (the CPU default) the batches run on several threads at once, each op single-threaded:
PyTorch's multi-threaded CPU kernels round differently with the thread count (an elementwise op split
mid-row takes its scalar tail path), single-threaded ones round the same everywhere, so results do not
depend on the machine's cores. With one worker, batches run in turn on torch's own threads.
Between parts the hidden states of all tokens wait in a HiddenStore. While a part computes, the next one is
read on a background thread: on CUDA it is loaded onto the device beside the current one; on CPU its bytes
are only read into the page cache and it is materialized after the current part is freed, so host memory
holds one part, not two. Memory is the largest part plus one batch of activations, whatever the depth.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch
from tqdm import tqdm

from qstream.engine.hidden import HiddenStore
from qstream.engine.model import EMBED, Part, StreamedModel

DEFAULT_BATCH_TOKENS = 8192  # tokens per forward call (at least one whole sequence)


@dataclass(frozen=True)
class Job:
    """Token sequences run independently: sequence k is ids[begin_k:end_k]; rows of the store follow them."""

    ids: torch.Tensor  # 1-D int64
    spans: tuple[tuple[int, int], ...]

    @cached_property
    def offsets(self) -> list[int]:
        """First store row of each sequence (and the total as the last entry)."""
        out = [0]
        for b, e in self.spans:
            out.append(out[-1] + e - b)
        return out

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    def batches(self, batch_tokens: int) -> list[tuple[int, int, int]]:
        """(first sequence, number of sequences, their length): runs of equal-length sequences of at most
        `batch_tokens` tokens (one sequence at least)."""
        out: list[tuple[int, int, int]] = []
        for k, (b, e) in enumerate(self.spans):
            n = e - b
            if out and out[-1][2] == n and (out[-1][1] + 1) * n <= batch_tokens:
                first, count, _ = out[-1]
                out[-1] = (first, count + 1, n)
            else:
                out.append((k, 1, n))
        return out

    def batch_ids(self, first: int, count: int) -> torch.Tensor:
        return torch.stack([self.ids[b:e] for b, e in self.spans[first:first + count]])


class Observer(Protocol):
    """Watches decoder layers: `layer_begin` right after the layer is loaded, `layer_end` after its last batch;
    `batch_begin`/`batch_end` around each batch's forward, in the thread that runs it (batches may overlap)."""

    def layer_begin(self, model: StreamedModel, index: int) -> None: ...

    def batch_begin(self, batch: int) -> None: ...

    def batch_end(self, batch: int) -> None: ...

    def layer_end(self, model: StreamedModel, index: int) -> None: ...


class Forward(Protocol):
    """Every batch through the live layer. `write`: its outputs replace the inputs in the store.
    `reference` (a run given a reference store, `write` False): each batch's reference rows go through the
    layer first, with the editor told (`Editor.reference`), then its own rows; `advance` also writes the
    reference outputs back, so call it in the last such pass, while the layer still holds its source weights."""

    def __call__(self, write: bool, reference: bool = False, advance: bool = False) -> None: ...


@runtime_checkable
class Editor(Observer, Protocol):
    """An Observer that changes the layer it watches (sequential GPTQ): between `layer_begin` and `layer_end`
    the engine calls `edit` instead of running the batches once. `forward(False)` runs every batch watched,
    the store keeping the layer's inputs, as often as the editor needs; after changing the layer's weights
    it must call `forward(True)` once, unwatched, so that the next layer reads the changed layer's outputs.
    With a reference store (the source model's hidden states of the same tokens) it must also advance that
    store by one `forward(False, reference=True, advance=True)` per layer, before changing the weights."""

    def edit(self, model: StreamedModel, index: int, forward: Forward) -> None: ...

    def reference(self, on: bool) -> None:
        """The layer calls that follow in this thread run reference rows (on) or the batch's own rows (off)."""


@dataclass
class PartTime:
    part: str
    wait_s: float  # reading/materializing not hidden behind the previous part's compute
    compute_s: float
    bytes: int


@dataclass
class RunStats:
    tokens: int
    parts: list[PartTime] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(p.wait_s + p.compute_s for p in self.parts)


def parts_in_turn(model: StreamedModel, parts: Sequence[Part], times: list[float], ahead: bool) -> Iterator[Part]:
    """Yield each part loaded, the next being read meanwhile (loaded if `ahead`, else only read into the page
    cache); each is freed once the caller is done with it. `times` receives the seconds spent waiting per part
    (for its reading, or loading, not hidden behind the previous part's compute)."""
    fetch = model.load if ahead else model.warm
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qstream-read") as pool:
        pending: Future | None = pool.submit(fetch, parts[0])
        waited = 0.0  # ahead: already waited for this part before the previous one was freed
        for k, part in enumerate(parts):
            t0 = time.perf_counter()
            if pending is not None:
                pending.result()
            if not ahead:
                model.load(part)
            times.append(waited + time.perf_counter() - t0)
            pending = pool.submit(fetch, parts[k + 1]) if k + 1 < len(parts) else None
            yield part
            t0 = time.perf_counter()
            if ahead and pending is not None:
                pending.result()  # the next part is in before this one goes: loading never races a free
            waited = time.perf_counter() - t0
            model.free(part)


@contextlib.contextmanager
def _single_threaded_ops(on: bool) -> Iterator[None]:
    threads = torch.get_num_threads()
    if on:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(model: StreamedModel, job: Job, store: HiddenStore, observer: Observer | None = None,
        observe_from: int = 0, batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = False,
        ahead: bool | None = None, workers: int | None = None, reference: HiddenStore | None = None) -> RunStats:
    """Embeddings, then every decoder layer over every token of `job`; `store` ends holding the last layer's
    output (before the final norm). `observer` watches layers from `observe_from` on. `ahead`: load the next
    part beside the current one (default: on CUDA, whose memory is not the host's). `workers`: batches run at
    once (default: one on CUDA, torch's thread count on CPU); with more than one, each op is single-threaded.
    `reference`: a second store, for an Editor, that the embeddings fill too and the editor advances through
    each layer's source weights (see Editor)."""
    cuda = model.device.type == "cuda"
    workers = (1 if cuda else torch.get_num_threads()) if workers is None else workers
    stats = RunStats(job.tokens)
    parts: list[Part] = [EMBED, *range(model.n_layers)]
    batches = job.batches(batch_tokens)
    waits: list[float] = []
    ref_store = reference

    def rows(st: HiddenStore, r0: int, count: int, length: int) -> torch.Tensor:
        return st.read(r0, r0 + count * length).view(count, length, -1).to(model.device)

    def one(k: int, watched: bool, part: Part, bar: tqdm, write: bool = True, ref: bool = False,
            advance: bool = False) -> None:
        first, count, length = batches[k]
        r0 = job.offsets[first]
        with torch.inference_mode():
            if watched:
                observer.batch_begin(k)  # type: ignore[union-attr]
            if part == EMBED:
                out = model.embed(job.batch_ids(first, count))
                if ref_store is not None:
                    ref_store.write(r0, out)
            else:
                if ref:
                    observer.reference(True)  # type: ignore[union-attr]
                    ref_out = model.layer_pass(rows(ref_store, r0, count, length))  # type: ignore[arg-type]
                    observer.reference(False)  # type: ignore[union-attr]
                    if advance:
                        ref_store.write(r0, ref_out)  # type: ignore[union-attr]
                out = model.layer_pass(rows(store, r0, count, length))
            if watched:
                observer.batch_end(k)  # type: ignore[union-attr]
            if write:
                store.write(r0, out)
        if write:
            bar.update(count * length)

    with tqdm(total=len(parts) * job.tokens, unit="tok", unit_scale=True, desc="layers", disable=not progress,
              dynamic_ncols=True) as bar, _single_threaded_ops(workers > 1), \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qstream-batch") as pool:
        for part in parts_in_turn(model, parts, waits, cuda if ahead is None else ahead):
            t0 = time.perf_counter()
            layer = part if isinstance(part, int) else None
            watched = observer is not None and layer is not None and layer >= observe_from
            if watched:
                observer.layer_begin(model, layer)  # type: ignore[union-attr, arg-type]

            def forward(write: bool, reference: bool = False, advance: bool = False, watched: bool = watched,
                        part: Part = part) -> None:
                """Every batch; watched batches when the observer sees this layer and (for an Editor) only
                while the store keeps the inputs."""
                edits = isinstance(observer, Editor)
                if reference and (ref_store is None or write or not edits):
                    raise ValueError("a reference pass needs a reference store, an editor and write=False")
                for done in [pool.submit(one, k, watched and not (edits and write), part, bar, write, reference,
                                         advance) for k in range(len(batches))]:
                    done.result()

            with model.live(*([] if layer is None else [model.layers[layer]])):
                if watched and isinstance(observer, Editor):
                    observer.edit(model, layer, forward)  # type: ignore[arg-type]
                else:
                    forward(True)
            if watched:
                observer.layer_end(model, layer)  # type: ignore[union-attr, arg-type]
            name = part if isinstance(part, str) else f"layer {part}"
            stats.parts.append(PartTime(name, waits[-1], time.perf_counter() - t0, model.part_bytes(part)))
            bar.set_postfix_str(name)
    return stats
