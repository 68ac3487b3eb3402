"""qstream calibrate on the layer-streaming engine, on Qwen3.5-35B-A3B-shaped checkpoints: memory, time, speed.

Builds (or reuses, shared with bench_quantize.py) synthetic checkpoints with the real shapes (bench/synthetic.py:
one decoder layer 1.75 GB in bf16 with fused experts [256, 1024, 2048] and [256, 2048, 512], embeddings and
lm_head 2.1 GB; DeltaNet layers with full attention every 4th), gives each a byte-level tokenizer and a text
file (this repository's README, repeated: nothing is fetched, so it runs on an offline GPU machine), then for
each checkpoint, one at a time on the same page cache (warm, or evicted before each row with --cold):
  cat         `cat` of its weight files to /dev/null: the read floor of this machine
  calibrate   `python -m qstream calibrate SRC STATS --device D --experts E ...` in a child process
  gptq        (--gptq) `python -m qstream quantize SRC DST --preset experts --method gptq ...`: sequential GPTQ of
              every routed expert through the engine, then the conversion (its per-layer solve times printed)
and prints one table: seconds (wall of the child; "own s" is the command's own time from its report: interpreter
start and the CLI's imports excluded, the import of the model's transformers classes included), GB/s of checkpoint
read and its share of cat's speed; for calibrate also "pass s", the engine pass alone (embeddings and every layer,
waits for reading included; the report's other phases in the note) and its share of cat's speed; tokens/s, peak
RSS of the child (VmHWM, polled) against the checkpoint's size; then per decoder layer: seconds waiting for its
weights (not hidden behind the previous layer's compute) and computing, and tokens/s.

    python bench/bench_engine.py                          # CPU, 2 and 4 layers, 2 x 256 tokens (a few minutes)
    python bench/bench_engine.py --device cuda --samples 128 --seq-len 2048 --experts all,routed   # lent GPU
    python bench/bench_engine.py --cold --json engine.json
    python bench/bench_engine.py --device cuda --layers 1 --experts all --gptq --samples 128 --seq-len 2048
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import ROOT, evict, qstream_cmd, run_child, run_reported  # first: the repository on sys.path

import torch
from bench_quantize import device_line, ensure_checkpoint, fmt_rss, warm, weight_bytes

from tests.test_evaluate import byte_tokenizer  # the tests' real byte-level BPE tokenizer


@dataclass
class Row:
    case: str
    layers: int
    ckpt_bytes: int
    seconds: float = float("nan")
    own_seconds: float = float("nan")
    tokens: int = 0
    peak_rss: int = 0
    peak_anon: int = 0  # RssAnon, polled: VmHWM less the mapped files' pages
    note: str = ""
    parts: list[dict] = field(default_factory=list)
    pass_seconds: float = float("nan")  # calibrate: the engine pass alone (its report's phases)

    @property
    def gbps(self) -> float:
        return self.ckpt_bytes / (self.own_seconds if self.own_seconds == self.own_seconds else self.seconds) / 1e9


def prepare(src: Path, work: Path, chars: int) -> Path:
    """A byte-level tokenizer in the checkpoint (once) and a text file of at least `chars` bytes."""
    if not (src / "tokenizer.json").exists():
        byte_tokenizer(src)
    text = work / f"text-{chars}.txt"
    if not text.exists():
        readme = (ROOT / "README.md").read_text()
        text.write_text(readme * (chars // len(readme) + 1))
    return text


def cat_row(src: Path, work: Path, layers: int) -> Row:
    files = sorted(str(p) for p in src.glob("*.safetensors"))
    c = run_child(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], work / f"cat-{layers}.log")
    return Row("cat (read floor)", layers, weight_bytes(src), c.wall, c.wall, 0, c.peak_rss, c.peak_anon,
               "" if c.rc == 0 else f"FAILED rc={c.rc}")


def calibrate_row(src: Path, text: Path, work: Path, layers: int, device: str, experts: str, args) -> Row:
    dst = work / f"calib-{device}-{experts}-{layers}"
    cmd = qstream_cmd("calibrate", str(src), str(dst), "--text-file", str(text), "--samples", str(args.samples),
                      "--seq-len", str(args.seq_len), "--device", device, "--experts", experts,
                      "--batch-tokens", str(args.batch_tokens), "--no-progress", "--overwrite")
    run = run_reported(cmd, dst, work / f"calib-{device}-{experts}-{layers}.log")
    row = Row(f"qstream calibrate ({device}, experts {experts})", layers, weight_bytes(src), run.wall,
              peak_rss=run.peak_rss, peak_anon=run.peak_anon, note=run.note)
    if run.report is not None:
        row.own_seconds, row.tokens, row.parts = run.report["seconds"], run.report["tokens"], run.report["parts"]
        row.pass_seconds = run.report["phases"]["pass"]
        row.note = ", ".join(f"{k} {v:.2f} s" for k, v in run.report["phases"].items())
    return row


def gptq_row(src: Path, text: Path, work: Path, layers: int, device: str, args, down: str) -> Row:
    dst = work / f"gptq-{device}-{layers}"
    cmd = qstream_cmd("quantize", str(src), str(dst), "--preset", "experts", "--method", "gptq",
                      "--calib-text", str(text), "--calib-samples", str(args.samples),
                      "--calib-seq-len", str(args.seq_len), "--device", device, "--no-progress", "--overwrite",
                      "--gptq-objective", args.gptq_objective, "--gptq-down", down)
    run = run_reported(cmd, dst, work / f"gptq-{device}-{layers}.log")
    row = Row(f"qstream quantize --method gptq ({device}, {args.gptq_objective}, down {down})", layers,
              weight_bytes(src), run.wall,
              peak_rss=run.peak_rss, peak_anon=run.peak_anon, note=run.note)
    if run.report is None:
        return row
    report = run.report
    solve = report["gptq"]["solve_report"]
    row.own_seconds, row.tokens, row.parts = report["totals"]["seconds"] + solve["seconds"], solve["tokens"], \
        solve["parts"]
    row.note = ("solve s per layer: " + ", ".join(f"{v:.1f}" for v in solve["solve_seconds"].values())
                + f"; cases {report['gptq']['cases']}")
    shutil.rmtree(dst, ignore_errors=True)
    return row


def print_tables(rows: list[Row]) -> None:
    head = (f"| {'case':<40} | layers | {'ckpt GB':>7} | {'seconds':>7} | {'own s':>6} | {'GB/s':>5} | {'of cat':>6} "
            f"| {'pass s':>6} | {'pass of cat':>11} "
            f"| {'tokens/s':>8} | {'peak RSS':>9} | {'RSS/ckpt':>8} | {'peak anon':>9} | {'anon/ckpt':>8} | note")
    print(head)
    print("|" + "-" * (len(head) - 1))
    for r in rows:
        cat = next((c for c in rows if c.case.startswith("cat") and c.layers == r.layers), None)
        share = f"{r.gbps / cat.gbps:6.0%}" if cat and not r.case.startswith("cat") else f"{'':>6}"
        passed = (f"{r.pass_seconds:6.1f} | {cat.seconds / r.pass_seconds:11.0%}" if cat and r.pass_seconds > 0
                  else f"{'':>6} | {'':>11}")
        tps = f"{r.tokens / r.own_seconds:8.0f}" if r.tokens else f"{'':>8}"
        print(f"| {r.case:<40} | {r.layers:>6} | {r.ckpt_bytes / 1e9:7.2f} | {r.seconds:7.1f} | {r.own_seconds:6.1f} "
              f"| {r.gbps:5.2f} | {share} | {passed} | {tps} | {fmt_rss(r.peak_rss):>9} "
              f"| {r.peak_rss / r.ckpt_bytes:8.2f} "
              f"| {fmt_rss(r.peak_anon):>9} | {r.peak_anon / r.ckpt_bytes:8.2f} | "
              f"{r.note}")
    for r in rows:
        if not r.parts:
            continue
        print(f"\n{r.case}, {r.layers} layers, {r.tokens} tokens: per part")
        print(f"| {'part':<9} | {'GB':>5} | {'wait s':>6} | {'compute s':>9} | {'tokens/s':>8} |")
        for p in r.parts:
            print(f"| {p['part']:<9} | {p['bytes'] / 1e9:5.2f} | {p['wait_s']:6.2f} | {p['compute_s']:9.2f} "
                  f"| {r.tokens / p['compute_s']:8.0f} |")
    calib = [r for r in rows if r.parts]
    for case in dict.fromkeys(r.case for r in calib):
        pts = sorted((r for r in calib if r.case == case), key=lambda r: r.layers)
        if len(pts) > 1:
            print(f"\ngrowth {case}: " + ", ".join(f"{p.layers}L peak RSS {fmt_rss(p.peak_rss)} "
                                                  f"({p.peak_rss / p.ckpt_bytes:.2f} of {p.ckpt_bytes / 1e9:.1f} GB; "
                                                  f"anonymous {fmt_rss(p.peak_anon)}), "
                                                  f"own {p.own_seconds:.1f} s" for p in pts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,4", help="comma-separated decoder layer counts (default 2,4)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qstream-bench"), help="checkpoints and outputs go here")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if present)")
    ap.add_argument("--experts", default="all", help="comma-separated --experts modes to run (all, routed; none)")
    ap.add_argument("--samples", type=int, default=2, help="calibration windows (default 2; a real run: 128)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256; a real run: 2048)")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward call")
    ap.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each row")
    ap.add_argument("--gptq", action="store_true", help="also time quantize --method gptq (experts preset)")
    ap.add_argument("--gptq-objective", default="layer", help="--gptq: layer (default) or source")
    ap.add_argument("--gptq-down", default="fit", help="--gptq: comma-separated --gptq-down values to run (fit, own)")
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    import transformers

    print(device_line())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; {args.samples} x {args.seq_len} "
          f"tokens, "
          f"batch {args.batch_tokens} tokens, {'cold' if args.cold else 'warm'} page cache", flush=True)
    rows: list[Row] = []
    for n in sorted(int(x) for x in args.layers.split(",")):
        src = ensure_checkpoint(args.work, n)
        text = prepare(src, args.work, args.samples * args.seq_len)
        for make in [lambda: cat_row(src, args.work, n)] + [
                lambda e=e: calibrate_row(src, text, args.work, n, device, e, args) for e in args.experts.split(",")
                if e != "none"] + ([lambda d=d: gptq_row(src, text, args.work, n, device, args, d)
                                    for d in args.gptq_down.split(",")] if args.gptq else []):
            evict(src) if args.cold else warm(src)
            rows.append(make())
            print(f"  {rows[-1].case}, {n} layers: {rows[-1].seconds:.1f} s, peak RSS {fmt_rss(rows[-1].peak_rss)} "
                  f"(anonymous {fmt_rss(rows[-1].peak_anon)}) "
                  f"{rows[-1].note}", flush=True)
    print()
    print_tables(rows)
    if args.json:
        args.json.write_text(json.dumps({"device": device_line(), "rows": [asdict(r) | {"gbps": r.gbps} for r in rows]},
                                        indent=1))


if __name__ == "__main__":
    main()
