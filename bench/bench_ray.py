"""`qstream quantize --ray` on one node: a local Ray instance with 1 worker vs N, against one process.

Builds (or reuses, as bench_quantize.py does) the Qwen3.5-35B-A3B-shaped synthetic checkpoint (bench/synthetic.py;
one decoder layer is 1.75 GB of bf16, embeddings and lm_head 2.1 GB), then converts it, each case in a fresh child
process on the same warm page cache, with the default recipe (experts preset, mse3) on the CPU:
  one process   `python -m qstream quantize SRC DST --device cpu` (the default path; its C kernel uses every core)
  ray N         quantize_checkpoint(..., cluster=Cluster(cpus=N)): a local Ray instance with N CPUs, one task
                (one worker, one thread) per output shard, so N shards are written at once
and prints one table: wall seconds of the child (Python start and imports included), the conversion's own
seconds from its report (Ray's start excluded), GB/s of input over those, speed-up over 1 worker and its
efficiency (speed-up / N; issue 16 asks >= 0.8 until the disk limits), and whether every output file but the
report is byte-identical to the one-process output. The shard size sets the parallelism: a shard is a task.

With --gptq, the same cases run `qstream quantize SRC DST --preset experts --method gptq` (a byte-level tokenizer
and this repository's README as calibration text, as bench_engine.py gives them), the ray cases with `--ray` on
a local instance of N CPUs: each layer's expert groups are tasks (one CPU, one thread each), while one process
solves them in turn; the table's "convert s" is then the GPTQ solve's own seconds (its report), with the
seconds per layer beside it. The groups are what the Hessian budget makes of the layer's experts (2 GiB on the
CPU: 9 groups of a 35B-shaped layer with 2 threads, 43 with 16), so N beyond that gains nothing.

    python bench/bench_ray.py                               # 1 layer, 1 and all-cores workers, 64MB shards
    python bench/bench_ray.py --layers 4 --workers 1,4,8,16 --json out.json   # on a larger machine
    python bench/bench_ray.py --gptq --samples 16 --seq-len 512 --workers 1,16   # GPTQ of one 35B-shaped layer
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from common import qstream_cmd, run_reported, same_outputs  # first: the repository on sys.path

from bench_engine import prepare
from bench_quantize import ensure_checkpoint, warm, weight_bytes

from qstream.common import cache_dir


def gptq_args(args: argparse.Namespace, text: Path) -> list[str]:
    return ["--preset", "experts", "--method", "gptq", "--calib-text", str(text), "--calib-samples", str(args.samples),
            "--calib-seq-len", str(args.seq_len)]


def gptq_child(workers: int, argv: list[str]) -> None:
    """One `ray N` GPTQ case in this process: Ray started with N CPUs, then the command with a bare --ray (which
    uses the Ray this process started)."""
    from qstream.cli import main
    from qstream.cluster import Cluster, connected

    with connected(Cluster(cpus=workers)):
        sys.argv = ["qstream", *argv, "--ray"]
        main()


def child(src: Path, dst: Path, workers: int, shard_size: str) -> None:
    """One `ray N` case in this process: plan as the CLI does, Ray started with N CPUs, the conversion."""
    from qstream.cluster import Cluster
    from qstream.format.rules import Rule
    from qstream.io.checkpoint import open_checkpoint
    from qstream.planning.plan import make_plan, parse_size
    from qstream.planning.selection import Selection
    from qstream.quantize import quantize_checkpoint

    plan = make_plan(open_checkpoint(src), Selection(), Rule.MSE3, parse_size(shard_size))
    quantize_checkpoint(plan, dst, device="cpu", overwrite=True, progress=False, cluster=Cluster(cpus=workers))


def case(name: str, cmd: list[str], src: Path, dst: Path, work: Path) -> dict:
    warm(src)
    run = run_reported(cmd, dst, work / f"{name.replace(' ', '-')}.log")
    if run.report is None:
        raise SystemExit(f"{name}: {run.note}")
    totals = run.report["totals"]
    row = {"case": name, "wall_s": run.wall, "seconds": totals["seconds"], "shards": totals["shards"],
           "bytes_in": totals["bytes_in"], "driver_peak_rss": run.peak_rss, "scale_out": run.report.get("scale_out")}
    if "gptq" in run.report:  # the solve is what the groups' tasks speed up: its own seconds, and per layer
        solve = run.report["gptq"]["solve_report"]
        row.update(seconds=solve["seconds"], solve_seconds=solve["solve_seconds"], scale_out=solve.get("scale_out"))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--workers", default=f"1,{os.cpu_count()}", help="comma-separated worker counts")
    ap.add_argument("--max-shard-size", default="64MB", help="a shard is a task [default: 64MB]")
    ap.add_argument("--work", type=Path, default=None, help="[default: $QSTREAM_CACHE/bench-ray]")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--gptq", action="store_true", help="GPTQ (--method gptq) instead of the default recipe")
    ap.add_argument("--samples", type=int, default=4, help="--gptq: calibration windows [default: 4]")
    ap.add_argument("--seq-len", type=int, default=512, help="--gptq: tokens per window [default: 512]")
    ap.add_argument("--src", type=Path, default=None, help="this checkpoint instead of the synthetic one")
    ap.add_argument("--child", nargs=4, metavar=("SRC", "DST", "N", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--gptq-child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gptq_child:
        return gptq_child(int(args.gptq_child[0]), args.gptq_child[1:])
    if args.child:
        src, dst, n, size = args.child
        return child(Path(src), Path(dst), int(n), size)
    work = args.work or cache_dir() / "bench-ray"
    work.mkdir(parents=True, exist_ok=True)
    src = args.src or ensure_checkpoint(work, args.layers)
    extra = gptq_args(args, prepare(src, work, 8 * args.samples * args.seq_len)) if args.gptq else []
    ref = work / "one-process" / "q"  # the card is titled with the directory's name: "q" for every case
    ref.parent.mkdir(exist_ok=True)
    flags = ["--device", "cpu", "--max-shard-size", args.max_shard_size, "--no-progress", "--overwrite", *extra]
    rows = [case("one process", qstream_cmd("quantize", str(src), str(ref), *flags), src, ref, work)]
    rows[0]["identical"] = True
    for n in map(int, args.workers.split(",")):
        dst = work / f"ray-{n}" / "q"
        dst.parent.mkdir(exist_ok=True)
        cmd = ([sys.executable, __file__, "--gptq-child", str(n), "quantize", str(src), str(dst), *flags] if args.gptq
               else [sys.executable, __file__, "--child", str(src), str(dst), str(n), args.max_shard_size])
        row = case(f"ray {n}", cmd, src, dst, work)
        row["workers"], row["identical"] = n, same_outputs(dst, ref)
        shutil.rmtree(dst)
        rows.append(row)
    base = next((r["seconds"] for r in rows if r.get("workers") == 1), None)
    gb = weight_bytes(src) / 1e9
    what = str(src) if args.src else f"{args.layers}-layer synthetic Qwen3.5-35B-A3B"
    how = (f"GPTQ of the routed experts on {args.samples} x {args.seq_len} tokens ('convert s': the solve)"
           if args.gptq else f"{rows[0]['shards']} output shards of <= {args.max_shard_size}")
    print(f"\n{what} ({gb:.2f} GB), {how}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end\n")
    print(f"| {'case':<12} | wall s | convert s | GB/s in | speed-up vs 1 worker | efficiency | identical |")
    print(f"|{'-' * 14}|--------|-----------|---------|----------------------|------------|-----------|")
    for r in rows:
        n = r.get("workers")
        speed = base / r["seconds"] if base and n else None
        print(f"| {r['case']:<12} | {r['wall_s']:6.1f} | {r['seconds']:9.1f} | {r['bytes_in'] / r['seconds'] / 1e9:7.3f} | "
              f"{f'{speed:.2f}x' if speed else '':>20} | {f'{speed / n:.2f}' if speed else '':>10} | "
              f"{'yes' if r['identical'] else 'NO':>9} |"
              + (f" solve s per layer: {', '.join(f'{v:.1f}' for v in r['solve_seconds'].values())}"
                 if "solve_seconds" in r else ""))
    if args.json:
        args.json.write_text(json.dumps({"layers": args.layers, "cores": os.cpu_count(), "gptq": args.gptq,
                                         "max_shard_size": args.max_shard_size, "rows": rows}, indent=2))
    shutil.rmtree(ref)
    if not all(r["identical"] for r in rows):
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
