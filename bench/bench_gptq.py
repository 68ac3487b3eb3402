"""rtn (mse3) vs imatrix vs sequential GPTQ on SmolLM2-135M (dense, MLP preset) and its top-2-of-8 MoE
(qstream.assets.build_smollm2_sparse_moe: every expert a full copy of the MLP, so the dense function under sparse
routing; with mse3 every expert quantizes alike and the MoE must score as the dense model does).

Each case is the real command, run as its own process so that its time and peak RSS are its own:
`qstream quantize SRC DST --preset P [--method imatrix|gptq --calib-samples N --calib-seq-len L]`
(imatrix calibrates first through the engine; gptq solves layer by layer through the engine). Calibration
text: the default, the END of the offline Wikipedia corpus (`qstream calibrate`'s default). Evaluation: the
FIRST `--eval-windows` windows of `--seq-len` tokens of the same corpus, tokenized whole (as `qstream eval`
takes them), so calibration and evaluation never share a token (about 1.07M tokens apart from end to start;
checked below). Every case is scored against the source on the same windows, in memory, float32 on CPU:
perplexity, mean KL(source || case) in nats, top-1 agreement, and for the KL difference against mse3 a paired
z over windows (positive: the case is better). SmolLM2's "bf16" weights are a dequantized Q4_1 model (see
qstream.assets): compare methods with each other, not with published absolute numbers.

    python bench/bench_gptq.py                                 # dense and moe, mse3, imatrix, gptq
    python bench/bench_gptq.py --models dense --cases mse3,gptq --calib-samples 32
    python bench/bench_gptq.py --solve                         # only: one 35B-shaped MoE layer's GPTQ solve
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

from quality import paired_z, score_cases, summed  # noqa: E402

from qstream import assets  # noqa: E402
from qstream.common import table  # noqa: E402
from qstream.io.text_sources import wikipedia  # noqa: E402
from qstream.io.tokens import tokenize  # noqa: E402

CASES = {"mse3": [], "imatrix": ["--method", "imatrix"], "gptq": ["--method", "gptq"],
         "gptq-source": ["--method", "gptq", "--gptq-objective", "source"],
         "gptq-own": ["--method", "gptq", "--gptq-down", "own"]}
HEADER = ["case", "PPL", "KL", "KL vs mse3", "paired z", "top-1", "rel. weight error", "time s", "peak RSS GiB"]


def models() -> dict[str, tuple[Path, str]]:
    dense = assets.build_smollm2_dense(assets.cache_dir() / "smollm2-135m")
    moe = assets.build_smollm2_sparse_moe(dense, assets.cache_dir() / "smollm2-135m-moe8-top2-copies")
    return {"dense": (dense, "mlp"), "moe": (moe, "experts")}


def quantize_case(src: Path, preset: str, case: str, dst: Path, samples: int, seq_len: int) -> dict:
    """One `qstream quantize` process; its report, wall time and the cases GPTQ solved."""
    calib = ["--calib-samples", str(samples), "--calib-seq-len", str(seq_len)] if CASES[case] else []
    cmd = [sys.executable, "-m", "qstream", "quantize", str(src), str(dst), "--preset", preset, "--device", "cpu",
           "--overwrite", "--no-progress", *CASES[case], *calib]
    for stale in dst.parent.glob(f".{dst.name}.qstream-*"):
        shutil.rmtree(stale)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    report = json.loads((dst / "qstream_report.json").read_text())
    return {"case": case, "path": str(dst), "seconds": seconds, "peak_rss_bytes": report["totals"]["peak_rss_bytes"],
            "rel_error": report["totals"]["rel_error"], "gptq_cases": report.get("gptq", {}).get("cases")}


def solve_bench(device: str) -> None:
    """GPTQ of one Qwen3.5-35B-A3B-shaped MoE layer (256 experts, hidden 2048, expert width 512): Hessians from
    correlated random activations routed top-8, then the batched solve; against reading the layer's bf16 bytes."""
    from qstream.calib.gptq import prepare, solve

    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    n_exp, hidden, inner, tokens = 256, 2048, 512, 8192
    mix = torch.randn(hidden, hidden, generator=g) / hidden**0.5
    x = (torch.randn(tokens, hidden, generator=g) @ mix).to(dev)
    w_up = (torch.randn(n_exp, 2 * inner, hidden, generator=g) * 0.02).to(dev)
    w_down = (torch.randn(n_exp, hidden, inner, generator=g) * 0.02).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    idx = torch.randint(0, n_exp, (tokens, 8), generator=g).to(dev)
    h_up = torch.zeros(n_exp, hidden, hidden, device=dev)
    h_down = torch.zeros(n_exp, inner, inner, device=dev)
    for e in range(n_exp):
        xe = x[(idx == e).any(-1)]
        h_up[e] = xe.T @ xe
        a = torch.nn.functional.silu(xe @ w_up[e, :inner].T) * (xe @ w_up[e, inner:].T)
        h_down[e] = a.T @ a
    sync()
    t1 = time.perf_counter()
    solve(w_up, prepare(h_up))
    solve(w_down, prepare(h_down))
    sync()
    t2 = time.perf_counter()
    gib = (w_up.numel() + w_down.numel()) * 2 / 2**30
    print(f"35B-shaped layer on {device}: Hessians {t1 - t0:.2f} s ({tokens} tokens), solve {t2 - t1:.2f} s; "
          f"its bf16 experts are {gib:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=assets.cache_dir() / "bench-gptq")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--solve", action="store_true", help="only the 35B-shaped layer solve")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
          flush=True)
    if args.solve:
        solve_bench(args.device)
        return
    cases = [c.strip() for c in args.cases.split(",")]
    if cases[0] != "mse3" or any(c not in CASES for c in cases):
        raise SystemExit(f"--cases: mse3 first, then any of {', '.join(CASES)}")
    results = {}
    for label, (src, preset) in models().items():
        if label not in args.models.split(","):
            continue
        text = wikipedia()
        ids, _ = tokenize(src, text)
        L = args.seq_len
        calib_tokens = args.calib_samples * L
        assert args.eval_windows * L < ids.numel() - 2 * calib_tokens, "calibration and eval text could overlap"
        work = args.workdir / label
        work.mkdir(parents=True, exist_ok=True)
        runs = []
        for case in cases:
            runs.append(quantize_case(src, preset, case, work / case, args.calib_samples, L))
            print(f"[{label}] {case}: {runs[-1]['seconds']:.0f} s, peak RSS {runs[-1]['peak_rss_bytes'] / 2**30:.2f} "
                  f"GiB, GPTQ cases {runs[-1]['gptq_cases']}", flush=True)
        source, per_case = score_cases(src, [Path(r["path"]) for r in runs], ids, L, args.eval_windows)
        src_t = summed(source)
        base_kl = summed(per_case[0]).kl / src_t.tokens
        rows = [["source (bf16)", f"{math.exp(src_t.nll / src_t.tokens):.3f}", "", "", "", "", "", "", ""]]
        data = []
        for r, wins in zip(runs, per_case, strict=True):
            t = summed(wins)
            kl = t.kl / t.tokens
            diff, z = paired_z(per_case[0], wins) if wins is not per_case[0] else (0.0, 0.0)
            rows.append([r["case"], f"{math.exp(t.nll / t.tokens):.3f}", f"{kl:.5f}",
                         "" if r is runs[0] else f"{100 * (kl / base_kl - 1):+.1f}%", "" if r is runs[0] else f"{z:+.2f}",
                         f"{100 * t.agree / t.tokens:.2f}%", f"{r['rel_error']:.4e}", f"{r['seconds']:.0f}",
                         f"{r['peak_rss_bytes'] / 2**30:.2f}"])
            data.append({**r, "ppl": math.exp(t.nll / t.tokens), "kl": kl, "top1": t.agree / t.tokens,
                         "kl_vs_mse3": kl / base_kl - 1, "z_vs_mse3": z, "kl_diff_mean": diff,
                         "per_window_kl": [w.kl / w.tokens for w in wins]})
        print(f"\n[{label}] {src.name}, preset {preset}; eval: Wikipedia first {args.eval_windows} x {L} tokens; "
              f"calibration: its last {args.calib_samples} x {L}; scored in float32 on CPU")
        print(table(HEADER, rows), flush=True)
        results[label] = {"source": src.name, "preset": preset, "seq_len": L, "eval_windows": args.eval_windows,
                          "calib_samples": args.calib_samples, "source_ppl": math.exp(src_t.nll / src_t.tokens),
                          "cases": data}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
