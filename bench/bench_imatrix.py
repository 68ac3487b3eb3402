"""imatrix vs mse3 on real weights and real text: does weighting each block's error by E[x^2] pay?

Models: SmolLM2-135M (dense, the MLP projections quantized: `--preset mlp`) and the 8-expert top-2 MoE made from
it (qstream.assets.build_smollm2_sparse_moe: every expert a full copy of the MLP, real sparse routing, the dense
function; every expert quantized). Text: the offline Wikipedia corpus, tokenized once by the model's tokenizer with
no special tokens (qstream.evaluate.tokenize). Calibration uses the LAST `--calib-windows` windows of `--seq-len`
tokens; evaluation the FIRST `--eval-windows` windows (non-overlapping, as `qstream eval --seq-len L
--max-windows N` takes them), so the two never share a token. Statistics come from tests/calib_stats.py (forward
hooks on the whole in-memory model, in the calibration contract's format; experts: every expert on every
token, as `qstream calibrate` does by default, or only routed tokens for the `routed` case). Each case is
quantized by qstream.convert.pipeline.run, the very code `qstream quantize --method imatrix --calib STATS` runs.

Scores per case, all on the same windows and with qstream.scoring.score: perplexity, mean KL(source ||
quant) in nats, top-1 agreement, and for the KL difference against mse3 a paired z: the mean over windows of
(KL_mse3 - KL_case) divided by its standard error (positive: the case is better). Also the chosen exponents'
offsets below R (RCEIL) and the seconds each quantization took.

    python bench/bench_imatrix.py                         # both models, every case (about 40 min on 2 busy cores)
    python bench/bench_imatrix.py --models dense --cases mse3,imatrix
    python bench/bench_imatrix.py --speed                 # only: torch imatrix vs mse3 (torch, C) on a bench shape
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import common  # noqa: F401  # first: the repository on sys.path

import torch
from quality import paired_z, score_cases, summed

from qstream import assets
from qstream.calib.channel_weights import ChannelWeights, ImatrixSettings
from qstream.calib.imatrix import quantize_weighted
from qstream.common import table
from qstream.convert.pipeline import run
from qstream.evals.evaluate import tokenize
from qstream.evals.scoring import Totals, windows
from qstream.format.kernels import quantize_fast
from qstream.format.mxfp4 import E8M0_BIAS, quantize, rule_exponents, to_blocks
from qstream.format.rules import Rule
from qstream.io.checkpoint import open_checkpoint
from qstream.io.text_sources import wikipedia
from qstream.planning.plan import make_plan
from qstream.planning.selection import Selection
from tests.calib_stats import collect_stats


@dataclass(frozen=True)
class Case:
    """One way to quantize: mse3 (no statistics), or imatrix with these settings and statistics."""

    name: str
    depth: int | None = None  # None: mse3
    mean_fraction: float = 0.0
    weighting: str = "x2"
    routed_stats: bool = False  # experts' statistics from routed tokens only (MoE)


CASES = [
    Case("mse3"),
    Case("imatrix", depth=2),
    Case("imatrix R-1..R", depth=1),
    Case("imatrix R-4..R", depth=4),
    Case("imatrix R-8..R", depth=8),
    Case("imatrix +0.01 mean", depth=2, mean_fraction=0.01),
    Case("imatrix +0.1 mean", depth=2, mean_fraction=0.1),
    Case("imatrix x2-sqrt", depth=2, weighting="x2-sqrt"),
    Case("imatrix routed", depth=2, routed_stats=True),
]


@dataclass
class Scored:
    case: Case
    path: Path
    seconds: float = 0.0
    offsets: list[int] = field(default_factory=list)  # blocks at R, R-1, ..., R-8
    per_window: list[Totals] = field(default_factory=list)


def models(work: Path) -> dict[str, tuple[Path, Selection]]:
    dense = assets.build_smollm2_dense(assets.cache_dir() / "smollm2-135m")
    moe = assets.build_smollm2_sparse_moe(dense, assets.cache_dir() / "smollm2-135m-moe8-top2-copies")
    return {"dense": (dense, Selection("mlp")), "moe": (moe, Selection("experts"))}


def offsets_histogram(src: Path, dst: Path) -> list[int]:
    """Blocks whose stored exponent is R - s, s = 0..8, over every quantized module (R from the source)."""
    from qstream.planning.plan import quant_jobs

    out_ckpt = open_checkpoint(dst)
    report = json.loads((dst / "qstream_report.json").read_text())
    ckpt = open_checkpoint(src)
    hist = torch.zeros(9, dtype=torch.int64)
    for t in report["tensors"]:
        for job in quant_jobs(ckpt, ckpt.tensors[t["name"]]):
            w = job.source.read_rows(job.row_start, job.row_end)
            r = rule_exponents(to_blocks(w).abs().amax(-1), Rule.RCEIL)
            scale = out_ckpt.tensors[job.module + ".weight_scale"]
            e = scale.read_rows(0, scale.info.shape[0]).to(torch.int32).reshape(r.shape) - E8M0_BIAS
            hist += torch.bincount((r - e).clamp(0, 8).flatten().long(), minlength=9)
    return hist.tolist()


def quantize_case(src: Path, selection: Selection, case: Case, stats: dict[bool, Path], dst: Path) -> Scored:
    plan = make_plan(open_checkpoint(src), selection, Rule.MSE3, 2 * 1000**3)
    imatrix = None
    if case.depth is not None:
        settings = ImatrixSettings(stats[case.routed_stats], case.depth, case.mean_fraction, case.weighting)
        imatrix = ChannelWeights(settings, plan)
    report = run(plan, dst, device="cpu", overwrite=True, progress=False, calibrated=imatrix)
    return Scored(case, dst, report["totals"]["seconds"], offsets_histogram(src, dst))


def report_rows(scored: list[Scored], source: list[Totals]) -> tuple[list[list[str]], list[dict]]:
    src = summed(source)
    base = scored[0]
    base_kl = summed(base.per_window).kl / src.tokens
    rows, data = [["source (bf16)", f"{math.exp(src.nll / src.tokens):.3f}", "", "", "", "", "", ""]], []
    for s in scored:
        t = summed(s.per_window)
        kl = t.kl / t.tokens
        diff, z = paired_z(base.per_window, s.per_window) if s is not base else (0.0, 0.0)
        blocks = sum(s.offsets) or 1
        shares = "/".join(f"{100 * c / blocks:.1f}" for c in (s.offsets[0], s.offsets[1], s.offsets[2],
                                                              sum(s.offsets[3:])))
        rows.append([s.case.name, f"{math.exp(t.nll / t.tokens):.3f}", f"{kl:.5f}",
                     "" if s is base else f"{100 * (kl / base_kl - 1):+.2f}%", "" if s is base else f"{z:+.2f}",
                     f"{100 * t.agree / t.tokens:.2f}%", shares, f"{s.seconds:.0f}"])
        data.append({"case": s.case.__dict__, "ppl": math.exp(t.nll / t.tokens), "kl": kl, "top1": t.agree / t.tokens,
                     "kl_vs_mse3": kl / base_kl - 1, "kl_diff_per_window_mean": diff, "z": z,
                     "offsets_R_minus_s": s.offsets, "quantize_seconds": s.seconds,
                     "per_window_kl": [w.kl / w.tokens for w in s.per_window]})
    return rows, data


HEADER = ["case", "PPL", "KL", "KL vs mse3", "paired z", "top-1", "% blocks R/R-1/R-2/<R-2", "quantize s"]


def speed(rows: int = 2048, cols: int = 2048) -> None:
    """Quantize one bf16 [rows, cols] weight: torch imatrix (depth 2 and 8) vs mse3 (torch path, C kernel)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    a = torch.exp2(torch.randn(cols, generator=g, dtype=torch.float64) * 2)
    fns = {"mse3 (C kernel)": lambda: quantize_fast(w), "mse3 (torch)": lambda: quantize(w),
           "imatrix R-2..R (torch)": lambda: quantize_weighted(w, a, 2),
           "imatrix R-8..R (torch)": lambda: quantize_weighted(w, a, 8)}
    out = []
    for name, fn in fns.items():
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        med = sorted(times)[1]
        out.append([name, f"{1e3 * med:.0f}", f"{w.numel() / med / 1e6:.1f}"])
    print(f"speed: bf16 [{rows}, {cols}], {torch.get_num_threads()} threads, median of 3")
    print(table(["quantizer", "ms", "M weights/s"], out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--cases", default=",".join(c.name for c in CASES))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=assets.cache_dir() / "bench-imatrix")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--speed", action="store_true", help="only the speed table")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    if args.speed:
        speed()
        return
    chosen = [c for name in args.cases.split(",") for c in CASES if c.name == name.strip()]
    if not chosen or chosen[0].name != "mse3":
        raise SystemExit("--cases must start with mse3 (the baseline)")
    results = {}
    for label, (src, selection) in models(args.workdir).items():
        if label not in args.models.split(","):
            continue
        text = wikipedia()
        ids, _ = tokenize(src, text)  # the whole text
        L = args.seq_len
        wins = windows(ids.numel(), L, L, args.eval_windows)
        calib = ids[ids.numel() - args.calib_windows * L:].reshape(args.calib_windows, L)
        assert wins[-1].end <= ids.numel() - args.calib_windows * L, "calibration and eval text overlap"
        print(f"[{label}] {src.name}: {ids.numel():,} tokens; calibration: last {args.calib_windows} x {L}; "
              f"eval: first {len(wins)} x {L}", flush=True)
        work = args.workdir / label
        stats = {False: work / "stats-all", True: work / "stats-routed"}
        recipe = {"source": src.name, "calib_ids_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest(),
                  "windows": list(calib.shape), "routed": label == "moe"}
        marker = work / "stats-recipe.json"
        if marker.is_file() and json.loads(marker.read_text()) == recipe:
            print("  statistics: reused (same model and calibration tokens)", flush=True)
        else:
            t0 = time.perf_counter()
            collect_stats(src, calib, stats[False], routed_out=stats[True] if recipe["routed"] else None)
            marker.write_text(json.dumps(recipe) + "\n")
            print(f"  statistics: {time.perf_counter() - t0:.0f} s", flush=True)
        scored = []
        for case in [c for c in chosen if label == "moe" or not c.routed_stats]:  # dense: no routing
            scored.append(quantize_case(src, selection, case, stats, work / case.name.replace(" ", "_")))
            print(f"  quantized {case.name}: {scored[-1].seconds:.0f} s", flush=True)
        source, per_case = score_cases(src, [s.path for s in scored], ids, L, args.eval_windows)
        for s, totals in zip(scored, per_case, strict=True):
            s.per_window = totals
        rows, data = report_rows(scored, source)
        print(f"\n[{label}] {src.name}, {selection.preset} preset; eval: Wikipedia first {len(wins)} x {L} tokens "
              f"({sum(w.n_scored for w in wins):,} scored), calibration: last {args.calib_windows} x {L}; float32 CPU")
        print(table(HEADER, rows), flush=True)
        results[label] = {"source": str(src.name), "preset": selection.preset, "seq_len": L, "eval_windows": len(wins),
                          "calib_windows": args.calib_windows, "cases": data}
        for s in scored:
            shutil.rmtree(s.path, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
