"""`qstream calibrate SRC STATS`: calibration text through the layer-streaming engine, into activation statistics.

STATS is a directory: `calibration.safetensors` (per quantizable source weight N: `N:x2_sum`, `N:tokens`, and
`N:routed` for routed experts; see qstream.calib.stats) and `calibration.json` (what was measured on what, and
which experts the router sent few or no tokens). Both are the same bytes run to run for the same settings;
times and memory go to `qstream_report.json` beside them.

Text: `samples` windows of `seq_len` tokens, no special tokens added, tokenized as eval tokenizes. The default
corpus (offline Wikipedia) is taken from its END, so calibration never sees the windows `qstream eval` scores
by default, which start at its beginning; a text you give is taken from its start.

STATS is written in a temp directory beside it, one file per finished decoder layer, and published whole at
the end; a killed run continues with `--resume` from the first unfinished layer (the layers before it are run
again for their outputs, without statistics).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qstream.calib.stats import EXPERT_MODES, ROUTED, Collector, experts_module, layer_file
from qstream.common import REPORT_NAME, Clock, peak_rss_bytes, resolve_device
from qstream.convert.dequantize import is_mxfp4_checkpoint
from qstream.engine.hidden import DEFAULT_BUDGET, HiddenStore
from qstream.engine.model import StreamedModel
from qstream.engine.run import DEFAULT_BATCH_TOKENS, Job, run
from qstream.errors import CalibrationSizeError, QstreamError
from qstream.io.checkpoint import Checkpoint, open_checkpoint
from qstream.io.safetensors_io import OutEntry, ShardWriter, read_header
from qstream.io.source_formats import decode_checkpoint
from qstream.io.staging import staging, write_json
from qstream.io.text_sources import Text
from qstream.io.tokens import tokenize
from qstream.planning.selection import Selection, decide

STATS_NAME, SUMMARY_NAME = "calibration.safetensors", "calibration.json"
SCHEMA = "qstream-calibration/1"
DEFAULT_SAMPLES, DEFAULT_SEQ_LEN = 128, 2048
STATS_PRESET = "all-linear"  # every weight a preset can quantize: all-linear contains experts and mlp
FEW_TOKENS = 0.1  # an expert the router sent under this share of its layer's mean gets "few" tokens
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class Settings:
    """How to calibrate. dtype auto = bfloat16 (the checkpoints' own precision: one layer in memory at half
    the float32 size)."""

    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    experts: str = "all"
    dtype: str = "auto"
    device: str = "auto"
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    hidden_budget: int = DEFAULT_BUDGET


def wanted_tensors(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Source weights (as the plan names them) any preset could quantize, with their shapes."""
    sel = Selection(STATS_PRESET, skip_indivisible=True)
    return {n: t.info.shape for n, t in decode_checkpoint(ckpt).tensors.items()
            if decide(n, t.info.shape, sel).quantize}


def calibration_ids(src: Path, text: Text, samples: int, seq_len: int) -> tuple[torch.Tensor, dict]:
    """samples x seq_len token ids, from the end of the default corpus or the start of a given text
    (CalibrationSizeError when it cannot: the caller words it with its own flags).

    Only the part needed is tokenized (tokenizing a whole corpus holds its offsets and strings: about 0.7 GB
    for the Wikipedia one): from a paragraph boundary, growing until it holds enough tokens."""
    if samples < 1 or seq_len < 2:
        raise CalibrationSizeError(lambda n, length: f"{n} {samples} / {length} {seq_len}: need at least 1 sample "
                                   "of 2 tokens")
    need = samples * seq_len
    from_end = text.source.get("kind") == "wikipedia"
    chars = need * 6  # about 4 characters per token in English: more than enough but for odd tokenizers
    while True:
        part = _part(text.text, chars, from_end)
        ids, _ = tokenize(src, Text(part, text.source))
        if ids.numel() >= need or len(part) == len(text.text):
            break
        chars *= 2
    if ids.numel() < need:
        raise CalibrationSizeError(lambda n, length: f"{_where(text)}: {ids.numel():,} tokens, but {n} {samples} x "
                                   f"{length} {seq_len} need {need:,}; give more text or lower {n} / {length}")
    taken = ids[-need:] if from_end else ids[:need]
    where = "last" if from_end else "first"
    return taken.clone(), {**text.describe(), "taken": f"{where} {need} tokens of the {where} {len(part)} characters"
                           + (" (from a paragraph boundary)" if len(part) < len(text.text) else "")}


def _part(text: str, chars: int, from_end: bool) -> str:
    """About `chars` characters from one end of `text`, cut at a blank line (the whole text if that is short)."""
    if chars >= len(text):
        return text
    if from_end:
        cut = text.find("\n\n", len(text) - chars)
        return text if cut < 0 else text[cut + 2:]
    cut = text.rfind("\n\n", 0, chars)
    return text if cut < 0 else text[:cut]


def _where(text: Text) -> str:
    return str(text.source.get("path") or text.source.get("package") or text.source.get("kind"))


def dtype_of(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16
    if name not in DTYPES:
        raise QstreamError(f"dtype {name!r} not supported; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _fingerprint(ckpt: Checkpoint, text: dict, s: Settings, device: torch.device) -> dict:
    return {"writer": "qstream calibrate", "qstream_version": __import__("qstream").__version__,
            "source": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in ckpt.weight_files],
            "text_sha256": text["sha256"], "taken": text["taken"], "device": device.type,
            **{k: v for k, v in asdict(s).items() if k not in ("device", "hidden_budget")}}


def calibrate(src: Path, dst: Path, text: Text, settings: Settings = Settings(), overwrite: bool = False,
              resume: bool = False, progress: bool = True) -> dict:
    """Write STATS `dst` for checkpoint `src` (see module doc); returns the summary written to calibration.json
    with the run's report under "report"."""
    t0 = time.perf_counter()
    clock = Clock(last=t0)  # the report's phases: model, text, pass, statistics
    if settings.experts not in EXPERT_MODES:
        raise QstreamError(f"--experts {settings.experts!r}: choose one of {', '.join(EXPERT_MODES)}")
    device, dtype = resolve_device(settings.device), dtype_of(settings.dtype)
    ckpt = open_checkpoint(Path(src))
    if is_mxfp4_checkpoint(ckpt):
        raise QstreamError(f"{ckpt.root}: already MXFP4; calibrate the checkpoint it was quantized from")
    wanted = wanted_tensors(ckpt)
    with StreamedModel(ckpt.root, dtype, device) as model:  # checks the model class and every layer's weights
        clock.lap("model")
        ids, text_info = calibration_ids(ckpt.root, text, settings.samples, settings.seq_len)
        clock.lap("text")
        if int(ids.max()) >= model.vocab_size:
            raise QstreamError(f"{ckpt.root}: its tokenizer yields id {int(ids.max())}, beyond the model's "
                               f"{model.vocab_size} embeddings; the tokenizer does not belong to this model")
        job = Job(ids, tuple((k * settings.seq_len, (k + 1) * settings.seq_len) for k in range(settings.samples)))
        fingerprint = _fingerprint(ckpt, text_info, settings, device)
        with staging(ckpt.root, Path(dst), overwrite, "qstream calibrate", fingerprint, resume,
                     bookkeeping=("layer-*.safetensors", "qstream-hidden-*")) as tmp:
            for stale in tmp.glob("qstream-hidden-*"):  # a killed run's spilled hidden states
                stale.unlink()
            done = [(tmp / layer_file(i)).exists() for i in range(model.n_layers)]
            first = done.index(False) if False in done else model.n_layers
            stats = None
            if first < model.n_layers:
                with HiddenStore(job.tokens, model.hidden_size, dtype, settings.hidden_budget, tmp, device) as store:
                    stats = run(model, job, store, Collector(wanted, settings.experts, tmp), first,
                                settings.batch_tokens, progress)
            clock.lap("pass")
            names = merge_layers(tmp, model.n_layers, tmp / STATS_NAME)
            summary = _summary(ckpt, model.model.config.model_type, text_info, settings, device, dtype, wanted,
                               names, tmp / STATS_NAME)
            write_json(tmp / SUMMARY_NAME, summary)
            clock.lap("statistics")
            report = {"seconds": time.perf_counter() - t0, "phases": clock.seconds, "peak_rss_bytes": peak_rss_bytes(),
                      "resumed_from_layer": first if resume else None, "tokens": job.tokens,
                      "parts": [asdict(p) for p in stats.parts] if stats else []}
            write_json(tmp / REPORT_NAME, report)
    return {**summary, "report": report}


def merge_layers(tmp: Path, n_layers: int, out: Path) -> list[str]:
    """The per-layer files into one safetensors file, layer by layer, copying bytes (flat memory)."""
    headers = [(tmp / layer_file(i), read_header(tmp / layer_file(i))) for i in range(n_layers)]
    entries = [(path, info) for path, h in headers for info in sorted(h.tensors.values(), key=lambda i: i.name)]
    writer = ShardWriter(out, [OutEntry(i.name, i.dtype, i.shape) for _, i in entries],
                         metadata={"format": "pt", "schema": SCHEMA})
    try:
        for path, info in entries:
            writer.copy_from(info.name, path, info)
        writer.close()
    finally:
        writer.abort()
    return [i.name for _, i in entries]


def _summary(ckpt: Checkpoint, model_type: str, text: dict, s: Settings, device: torch.device, dtype: torch.dtype,
             wanted: dict[str, tuple[int, ...]], names: list[str], stats_file: Path) -> dict:
    covered = {n.rpartition(":")[0] for n in names}
    return {
        "schema": SCHEMA,
        "qstream_version": __import__("qstream").__version__,
        "source": str(ckpt.root.resolve()),
        "model_type": model_type,
        "text": text,
        "samples": s.samples,
        "seq_len": s.seq_len,
        "tokens": s.samples * s.seq_len,
        "experts": s.experts,
        "experts_meaning": {"all": "every expert's inputs measured on every token; the layer's output keeps "
                                   "the router's choice",
                            "routed": "each expert's inputs measured on the tokens routed to it"}[s.experts],
        "dtype": str(dtype).removeprefix("torch."),
        "device": device.type,
        "batch_tokens": s.batch_tokens,
        "preset": STATS_PRESET,
        "tensors_with_statistics": len(covered),
        "without_statistics": sorted(set(wanted) - covered),
        "few_tokens": f"routed fewer than {FEW_TOKENS:.0%} of its layer's mean",
        "expert_coverage": expert_coverage(stats_file),
    }


def expert_coverage(stats_file: Path, per_expert: bool = False) -> list[dict]:
    """Per routed-experts module: tokens routed per expert (min/mean/max), and experts with none or few;
    `per_expert` adds every expert's count (`routed`: the quantize report's table and plot)."""
    from safetensors import safe_open

    routed: dict[str, dict[int, int]] = {}
    with safe_open(str(stats_file), "pt") as f:
        for key in f.keys():
            name, _, kind = key.rpartition(":")
            if kind != ROUTED:
                continue
            t = f.get_tensor(key)
            module, expert = experts_module(name)
            if expert is not None:  # one expert's own weight
                routed.setdefault(module, {})[expert] = int(t)
            else:
                routed.setdefault(module, {}).update(enumerate(t.tolist()))
    return coverage_of(routed, per_expert)


def coverage_of(routed: dict[str, dict[int, int]], per_expert: bool = False) -> list[dict]:
    """expert_coverage's entries from tokens routed per expert, by experts module."""
    out = []
    for module, per in routed.items():
        counts = [per[e] for e in sorted(per)]
        mean = sum(counts) / len(counts)
        out.append({"module": module, "experts": len(counts), "routed_min": min(counts), "routed_mean": mean,
                    "routed_max": max(counts), "without_tokens": [e for e, c in enumerate(counts) if c == 0],
                    "few_tokens": [e for e, c in enumerate(counts) if 0 < c < FEW_TOKENS * mean],
                    **({"routed": counts} if per_expert else {})})
    return out


def summary_text(summary: dict, dst: Path) -> str:
    """A few lines for the terminal: what was written and which experts calibration barely saw."""
    cov = summary["expert_coverage"]
    none = sum(len(c["without_tokens"]) for c in cov)
    few = sum(len(c["few_tokens"]) for c in cov)
    r = summary["report"]
    lines = [f"wrote {dst}: statistics of {summary['tensors_with_statistics']} weights from {summary['tokens']:,} "
             f"tokens ({summary['samples']} x {summary['seq_len']}, experts: {summary['experts']}); "
             f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB"]
    if cov:
        lines.append(f"routed experts: {sum(c['experts'] for c in cov)} in {len(cov)} layers; {none} got no "
                     f"token, {few} got few (under {FEW_TOKENS:.0%} of their layer's mean)")
        for c in cov:
            if c["without_tokens"] or c["few_tokens"]:
                lines.append(f"  {c['module']}: none {c['without_tokens']}, few {c['few_tokens']}")
    if summary["without_statistics"]:
        lines.append(f"no statistics for {len(summary['without_statistics'])} weights, e.g. "
                     f"{summary['without_statistics'][0]}")
    return "\n".join(lines)
