"""Per-module channel weights for imatrix quantization, read from a STATS directory.

STATS (the calibration contract of notes/LAYOUT.md, written by `qstream calibrate`) holds, per quantizable
source weight N, `N:x2_sum` (float64, [in], or [E, in] for a fused [E, out, in] expert tensor) and `N:tokens`
(int64, [] or [E]). An output module's weight of input channel j is a_j = x2_sum[j] / tokens (+ a fraction
of their mean, see ImatrixSettings). A tensor absent from STATS, or an expert with tokens == 0, has no
statistics: it is quantized with mse3 and counted as such in the report. Everything is checked against the
plan from headers before any data moves; each module reads only its own row of statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qstream.calib.calibrate import STATS_NAME, expert_coverage
from qstream.calib.imatrix import DEPTH, MAX_DEPTH, quantize_weighted
from qstream.errors import QstreamError
from qstream.format.mxfp4 import Quantized
from qstream.format.rules import Method
from qstream.io.safetensors_io import TensorInfo, read_header, read_rows
from qstream.io.source_formats import PackedExperts
from qstream.planning.plan import Plan, QuantJob

X2_SUM, TOKENS = ":x2_sum", ":tokens"
MEAN_FRACTION = 0.0  # the default: plain mean x^2 (bench/bench_imatrix.py measured the alternatives)
WEIGHTINGS = {
    "x2": "mean x^2 per input channel",
    "x2-sqrt": "mean x^2 per input channel x sqrt(mean w^2 of the row + w^2) (llama.cpp's quantizers)",
}


@dataclass(frozen=True)
class ImatrixSettings:
    """How STATS become exponents: the candidate depth (imatrix.DEPTH), the share of a tensor's mean channel
    weight added to every channel (smoothing: 0 is the plain mean x^2), and the weighting (WEIGHTINGS)."""

    stats: Path
    depth: int = DEPTH
    mean_fraction: float = MEAN_FRACTION
    weighting: str = "x2"

    def describe(self) -> dict:
        return {"stats": str(self.stats), "depth": self.depth, "candidates": f"R-{self.depth}..R",
                "mean_fraction": self.mean_fraction, "weighting": self.weighting,
                "weights": WEIGHTINGS[self.weighting] + (f", + {self.mean_fraction:g} x its mean over channels"
                                                         if self.mean_fraction else "")}


class ChannelWeights:
    """STATS checked against a plan: `for_job(job)` gives a module's channel weights [in], or None."""

    def __init__(self, settings: ImatrixSettings, plan: Plan) -> None:
        if not 0 <= settings.depth <= MAX_DEPTH:
            raise QstreamError(f"imatrix depth {settings.depth}: choose 0..{MAX_DEPTH}")
        if not settings.mean_fraction >= 0:
            raise QstreamError(f"imatrix mean fraction {settings.mean_fraction}: must be >= 0")
        if settings.weighting not in WEIGHTINGS:
            raise QstreamError(f"imatrix weighting {settings.weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        self.settings = settings
        self.file = Path(settings.stats) / STATS_NAME
        if not self.file.is_file():
            raise QstreamError(f"{settings.stats}: no {STATS_NAME}; run `qstream calibrate "
                               f"{plan.source.root} {settings.stats}` and pass that directory to --calib")
        self.tensors = read_header(self.file).tensors
        self.sources = {n: plan.source.tensors[n] for n in plan.quantized_sources
                        if not isinstance(plan.source.tensors[n], PackedExperts)}  # gpt-oss MXFP4: copied
        covered = [n for n, t in self.sources.items() if self._check(n, t.info.shape)]
        if self.sources and not covered:
            raise QstreamError(f"{self.file}: statistics for none of the {len(self.sources)} tensors to quantize "
                               f"(e.g. {next(iter(self.sources))}); calibrate this model: qstream calibrate "
                               f"{plan.source.root} STATS")

    def _check(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether STATS has entries for source tensor `name`; QstreamError if they do not fit it."""
        x2, tok = self.tensors.get(name + X2_SUM), self.tensors.get(name + TOKENS)
        if x2 is None and tok is None:
            return False
        lead = shape[:1] if len(shape) == 3 else ()  # a fused [E, out, in] tensor: a row per expert
        for info, pair, dtype, wanted in ((x2, X2_SUM, "F64", (*lead, shape[-1])), (tok, TOKENS, "I64", lead)):
            if info is None:
                raise QstreamError(f"{self.file}: {name}{pair} is missing beside its pair; re-run qstream calibrate")
            if info.dtype != dtype or info.shape != wanted:
                raise QstreamError(f"{self.file}: {info.name} is {info.dtype}{list(info.shape)}, but source tensor "
                                   f"{name} {list(shape)} needs {dtype}{list(wanted)}; the statistics are for "
                                   "another model: calibrate this one")
        return True

    def for_job(self, job: QuantJob) -> torch.Tensor | None:
        """Channel weights float64 [in] of one output module, or None when it has no statistics."""
        name = job.source.name
        if name not in self.sources or name + X2_SUM not in self.tensors:
            return None
        x2, tok = self.tensors[name + X2_SUM], self.tensors[name + TOKENS]
        expert = job.row_start // job.source.info.shape[1] if len(job.source.info.shape) == 3 else 0
        tokens = int(self._read(tok, 0).reshape(-1)[expert])
        if tokens <= 0:
            return None
        a = self._read(x2, expert)[0] / tokens
        if not (torch.isfinite(a).all() and (a >= 0).all()):
            raise QstreamError(f"{self.file}: {x2.name} holds negative or non-finite sums"
                               f"{f' for expert {expert}' if tok.shape else ''}; re-run qstream calibrate")
        return a + self.settings.mean_fraction * a.mean()

    def describe(self) -> dict:
        """The settings, and what calibration saw of each routed-experts module (tokens per expert), for the
        run's report and its card."""
        return {**self.settings.describe(), "expert_coverage": expert_coverage(self.file, per_expert=True)}

    method = Method.IMATRIX.value

    def quantize(self, w: torch.Tensor, a: torch.Tensor, row: int = 0) -> Quantized:
        """Rows w [rows, in] of one module (whole rows; the first is `row`) with its channel weights a [in]."""
        if self.settings.weighting == "x2-sqrt":
            w2 = w.double() ** 2
            a = a.to(w.device) * torch.sqrt(w2.mean(-1, keepdim=True) + w2)
        return quantize_weighted(w, a.to(w.device), self.settings.depth)

    def _read(self, info: TensorInfo, row: int) -> torch.Tensor:
        return read_rows(self.file, info, row, row + 1)

    def fingerprint(self) -> dict:
        """What a resumed run must find unchanged: the statistics file and the settings."""
        st = self.file.stat()
        return {**self.settings.describe(), "file": [str(self.file), st.st_size, st.st_mtime_ns]}
