"""What calibration saw of each routed-experts layer, for the card of an imatrix run: a table and a heatmap.

Both come from DST's qstream_report.json alone: its imatrix section holds every expert's routed calibration
tokens (from STATS, qstream.calib.calibrate.expert_coverage), its tensors the squared weight error and norm of
each expert's weights (a fused [E, out, in] tensor per expert, a per-expert weight as itself). An expert's
weight error is sum((Wq - W)^2) / sum(W^2) over all of its quantized projections.

The heatmap (expert_coverage.png beside the card) needs the `plot` extra (matplotlib). It is drawn by the Agg
renderer into a figure of fixed size and dpi, without the Software tag or any time, so the same report gives
the same bytes.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qstream.calib.stats import experts_module
from qstream.common import table
from qstream.format.rules import Method

PLOT_NAME = "expert_coverage.png"
PLOT_HOWTO = ("The heatmap of routed tokens and weight error per expert needs matplotlib: "
              "`pip install 'qstream[plot]'`, then `qstream card DST` draws it here.")
LAYER = re.compile(r"\.layers\.(\d+)\.")
SHOWN = 8  # expert indices listed per cell; more are counted


@dataclass
class ExpertsLayer:
    """One routed-experts module: routed calibration tokens and relative weight error, per expert."""

    module: str
    routed: list[int]
    rel_error: list[float]  # nan: an expert whose weights were not quantized
    without_tokens: list[int]
    few_tokens: list[int]

    @property
    def layer(self) -> int:
        m = LAYER.search(self.module + ".")
        return int(m[1]) if m else -1


def experts_layers(report: dict) -> list[ExpertsLayer]:
    """Per routed-experts module of an imatrix run's report, in layer order; [] for other runs and dense models."""
    section = report.get(Method.IMATRIX.value) or report.get(Method.GPTQ.value) or {}
    coverage = section.get("expert_coverage") or []
    sums = {c["module"]: ([0.0] * c["experts"], [0.0] * c["experts"]) for c in coverage}
    for t in report["tensors"]:
        module, expert = experts_module(t["name"])
        if module not in sums:
            continue
        err, norm = sums[module]
        pairs = (zip(t["expert_sq_error"], t["expert_sq_norm"]) if expert is None and "expert_sq_error" in t
                 else [(t["sq_error"], t["sq_norm"])])
        for e, (a, b) in enumerate(pairs, start=expert or 0):
            err[e] += a
            norm[e] += b
    out = [ExpertsLayer(c["module"], c["routed"], [a / b if b else math.nan for a, b in zip(*sums[c["module"]])],
                        c["without_tokens"], c["few_tokens"]) for c in coverage]
    return sorted(out, key=lambda x: (x.layer, x.module))


def _indices(experts: list[int]) -> str:
    if not experts:
        return "none"
    shown = ", ".join(map(str, experts[:SHOWN]))
    return shown + (f" (+{len(experts) - SHOWN} more)" if len(experts) > SHOWN else "")


def _spread(values: list[float], fmt: str) -> str:
    v = [x for x in values if not math.isnan(x)]
    return " / ".join(format(x, fmt) for x in (min(v), sum(v) / len(v), max(v))) if v else "-"


def coverage_table(layers: list[ExpertsLayer]) -> str:
    """Markdown: per layer, routed tokens per expert (min / mean / max), experts with none and with few, and
    the experts' relative weight error (min / mean / max)."""
    rows = [[f"`{x.module}`", str(len(x.routed)), _spread([float(c) for c in x.routed], ".0f"),
             _indices(x.without_tokens), _indices(x.few_tokens), _spread(x.rel_error, ".3e")] for x in layers]
    return table(["Experts module", "Experts", "Routed tokens min / mean / max", "Experts without tokens",
                  "Experts with few", "Weight error min / mean / max"], rows)


def write_plot(path: Path, layers: list[ExpertsLayer]) -> bool:
    """Draw the heatmap (routed tokens, weight error; layers x experts) to `path` atomically. False when
    matplotlib is not installed (nothing is written)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    import numpy as np

    routed = np.array([x.routed for x in layers], dtype=float)
    error = np.array([x.rel_error for x in layers], dtype=float)
    rows, experts = routed.shape
    fig = Figure(figsize=(10, 2 * (1.2 + min(rows, 48) * 0.12)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    empty_y, empty_x = np.nonzero(routed == 0)
    step = max(1, math.ceil(rows / 16))
    for ax, data, title, cmap in ((axes[0], routed, "routed calibration tokens", "viridis"),
                                  (axes[1], error, "relative squared weight error", "magma")):
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap)
        fig.colorbar(im, ax=ax, pad=0.01)
        if len(empty_x):
            ax.scatter(empty_x, empty_y, marker="x", s=12, c="red", linewidths=0.8, label="no routed token")
            ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
        ax.set_title(f"{title} per expert", fontsize=9)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_yticks(range(0, rows, step), [str(x.layer) for x in layers[::step]], fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    axes[1].set_xlabel(f"expert (of {experts})", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    os.replace(tmp, path)
    return True
