"""qstream quantize vs llm-compressor model_free_ptq vs a plain copy, on Qwen3.5-35B-A3B-shaped checkpoints.

Builds (or reuses) synthetic checkpoints with the real tensor shapes (bench/synthetic.py: fused experts
[256, 1024, 2048] and [256, 2048, 512], embeddings, DeltaNet and attention layers; one layer is 3.5 GB),
then runs, one at a time on the same warm page cache:
  copy       `cp -r` of the same files (the I/O floor of this machine)
  qstream    `python -m qstream quantize SRC DST --device D` (cpu, and cuda when present), default
             `experts` preset and mse3 rule
  llm-comp.  `model_free_ptq(SRC, DST, scheme="MXFP4A16")` (EVEN rule, no search) in its own virtualenv,
             ignoring everything but the routed experts like qstream
and prints one table: seconds (wall of the child, process start included; "own s" is the time qstream's
report gives, imports and CUDA start excluded), GB/s of input, peak RSS of the child (its VmHWM, polled), relative weight error
of the routed experts (||dequantized - w||^2 / ||w||^2, decoded from each output), plus kernel-only
rows (bench_kernels.py) and how time and memory grow with the number of layers.

    python bench/bench_quantize.py                      # 1 and 2 layers, peer at 1 layer
    python bench/bench_quantize.py --layers 1,2,4       # if the disk has room (checked first)
    python bench/bench_quantize.py --no-peer --json out.json
The peer's virtualenv: python3 -m venv /work/lcvenv && /work/lcvenv/bin/pip install torch==2.13.0 &&
/work/lcvenv/bin/pip install llmcompressor==0.14.0.1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import BENCH, qstream_cmd, run_child, run_reported, same_outputs  # first: the repository on sys.path

import bench_kernels
import synthetic
import torch
from safetensors import safe_open

from qstream.common import CARD_NAME, REPORT_NAME
from qstream.format.mxfp4 import dequantize

LAYER_BYTES = 1.75e9  # one synthetic decoder layer, bf16
FIXED_BYTES = 2.1e9  # embeddings + lm_head
EXPERT_KEYS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


@dataclass
class Row:
    case: str
    layers: int
    seconds: float = float("nan")
    bytes_in: int = 0
    peak_rss: int = 0
    rel_error: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes_in / self.seconds / 1e9


def weight_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))


def warm(ckpt: Path) -> None:
    """Read every file once so that each row starts from the same (warm) page cache."""
    for p in ckpt.iterdir():
        with open(p, "rb") as fh:
            while fh.read(64 << 20):
                pass


def ensure_checkpoint(work: Path, layers: int) -> Path:
    path = work / f"syn-{layers}"
    done = path / ".complete"
    if not done.exists():
        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        synthetic.build(path, layers)
        done.write_text("built by bench/bench_quantize.py\n")
        print(f"built {path} ({weight_bytes(path) / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def expert_rel_error(src: Path, out: Path) -> float:
    """||decode(out) - src||^2 / ||src||^2 over the routed experts, read back from the output files."""
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    src_index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    err = norm = 0.0
    for name, fname in src_index.items():
        key = next((k for k in EXPERT_KEYS if name.endswith(f"mlp.experts.{k}")), None)
        if key is None:
            continue
        prefix = name[: -len(key)]
        with safe_open(src / fname, "pt") as f:
            fused = f.get_tensor(name)
        parts = EXPERT_KEYS[key]
        rows = fused.shape[1] // len(parts)
        for e in range(fused.shape[0]):
            for i, part in enumerate(parts):
                base = f"{prefix}{e}.{part}.weight"
                with safe_open(out / index[f"{base}_packed"], "pt") as f:
                    packed = f.get_tensor(f"{base}_packed")
                with safe_open(out / index[f"{base}_scale"], "pt") as f:
                    scales = f.get_tensor(f"{base}_scale")
                w = fused[e, i * rows:(i + 1) * rows].double()
                err += float(((dequantize(packed, scales, torch.float32).double() - w) ** 2).sum())
                norm += float((w * w).sum())
    return err / norm


def qstream_row(src: Path, work: Path, layers: int, device: str) -> Row:
    dst = work / f"out-qstream-{device}-{layers}"
    run = run_reported(qstream_cmd("quantize", str(src), str(dst), "--device", device, "--no-progress", "--overwrite"),
                       dst, work / f"qstream-{device}-{layers}.log")
    row = Row(f"qstream quantize mse3 ({device})", layers, run.wall, weight_bytes(src), run.peak_rss, note=run.note)
    if run.report is not None:
        totals = run.report["totals"]
        row.extra = {"report_rel_error": totals["rel_error"], "report_seconds": totals["seconds"], "out": str(dst)}
    return row


def peer_row(src: Path, work: Path, layers: int, venv: Path) -> Row:
    dst = work / f"out-llmcompressor-{layers}"
    shutil.rmtree(dst, ignore_errors=True)
    c = run_child([str(venv / "bin" / "python"), str(BENCH / "peer_llmcompressor.py"), str(src), str(dst)],
                  work / f"llmcompressor-{layers}.log")
    row = Row("llm-compressor model_free_ptq MXFP4A16 (cpu)", layers, c.wall, weight_bytes(src), c.peak_rss)
    row.note = f"FAILED rc={c.rc}, see {work}/llmcompressor-{layers}.log" if c.rc else "EVEN rule, no search"
    row.extra = {"out": str(dst)}
    return row


def copy_row(src: Path, work: Path, layers: int) -> Row:
    dst = work / f"out-copy-{layers}"
    shutil.rmtree(dst, ignore_errors=True)
    c = run_child(["cp", "-r", str(src), str(dst)], work / f"copy-{layers}.log")
    row = Row("cp -r (plain copy)", layers, c.wall, weight_bytes(src), c.peak_rss, note="" if c.rc == 0 else f"rc={c.rc}")
    shutil.rmtree(dst, ignore_errors=True)
    return row


def versions(venv: Path | None) -> str:
    import qstream

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"qstream {qstream.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    if venv and (venv / "bin" / "python").exists():
        out = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('llmcompressor'), m.version('torch'))"],
                             capture_output=True, text=True).stdout.split()
        if out:
            parts.append(f"llmcompressor {out[0]} (torch {out[1]}, own venv)")
    return ", ".join(parts)


def device_line() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM{gpu}"


def plan_layers(work: Path, wanted: list[int], peer: bool) -> list[int]:
    """Drop layer counts the disk cannot hold (source + outputs), saying so."""
    free = shutil.disk_usage(work).free
    kept = []
    for n in sorted(wanted):
        src = FIXED_BYTES + n * LAYER_BYTES
        need = (0 if (work / f"syn-{n}" / ".complete").exists() else src) + src * (1.6 if peer else 1.3) + 1e9
        if need > free:
            print(f"skipping {n} layers: needs ~{need / 1e9:.0f} GB, {free / 1e9:.0f} GB free in {work}", flush=True)
            continue
        kept.append(n)
        free -= (0 if (work / f"syn-{n}" / ".complete").exists() else src)
    return kept


def fmt_rss(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def print_table(rows: list[Row], kernel: list[dict], growth: list[str]) -> None:
    head = (f"| {'case':<46} | layers | {'seconds':>8} | {'GB/s in':>7} | {'own s':>6} | {'peak RSS':>9} "
            f"| {'rel err experts':>15} | note")
    print(head)
    print("|" + "-" * (len(head) - 1))
    for r in rows:
        err = f"{r.rel_error:.6f}" if r.rel_error is not None else "-"
        own = f"{r.extra['report_seconds']:6.1f}" if "report_seconds" in r.extra else f"{'-':>6}"
        print(f"| {r.case:<46} | {r.layers:>6} | {r.seconds:8.1f} | {r.gbps:7.3f} | {own} | {fmt_rss(r.peak_rss):>9} "
              f"| {err:>15} | {r.note}")
    for k in kernel:
        print(f"| {bench_kernels.fmt_rate(k)}")
    for g in growth:
        print(f"| {g}")


def growth_lines(rows: list[Row]) -> list[str]:
    lines = []
    for case in dict.fromkeys(r.case for r in rows):
        pts = sorted((r for r in rows if r.case == case and not r.note.startswith("FAILED")), key=lambda r: r.layers)
        if len(pts) < 2 or not case.startswith("qstream"):
            continue
        a = pts[0]
        steps = ", ".join(f"{p.layers}L {p.seconds:.1f} s ({p.seconds / a.seconds:.2f}x for {p.bytes_in / a.bytes_in:.2f}x input)"
                          f" RSS {fmt_rss(p.peak_rss)}" for p in pts)
        lines.append(f"growth {case}: {steps}")
    for peer in (r for r in rows if r.case.startswith("llm-compressor") and not r.note.startswith("FAILED")):
        for r in rows:
            if r.case.startswith("qstream") and r.layers == peer.layers and not r.note.startswith("FAILED"):
                lines.append(f"speed-up {r.case} over llm-compressor at {r.layers}L: {peer.seconds / r.seconds:.1f}x "
                             f"end to end (copy of the same files: {peer.seconds / next(c.seconds for c in rows if c.case.startswith('cp') and c.layers == r.layers):.1f}x)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="1,2", help="comma-separated layer counts to build and run (default 1,2)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qstream-bench"), help="checkpoints and outputs go here")
    ap.add_argument("--devices", default="auto", help="qstream devices: auto (cpu, plus cuda if present) or e.g. cpu")
    ap.add_argument("--lcvenv", type=Path, default=Path("/work/lcvenv"), help="llm-compressor's virtualenv")
    ap.add_argument("--no-peer", action="store_true", help="skip llm-compressor")
    ap.add_argument("--peer-layers", default="1", help="layer counts at which to run llm-compressor (default 1)")
    ap.add_argument("--no-kernel", action="store_true", help="skip the kernel-only rows")
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    peer = not args.no_peer and (args.lcvenv / "bin" / "python").exists()
    if not args.no_peer and not peer:
        print(f"llm-compressor skipped: no virtualenv at {args.lcvenv} (see --help)", flush=True)
    devices = (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]) if args.devices == "auto" else args.devices.split(",")
    layers = plan_layers(args.work, [int(x) for x in args.layers.split(",")], peer)
    peer_layers = {int(x) for x in args.peer_layers.split(",")}
    print(device_line())
    print(versions(args.lcvenv if peer else None), flush=True)

    rows: list[Row] = []
    for n in layers:
        src = ensure_checkpoint(args.work, n)
        shapes = synthetic.layer_tensors(0)
        print(f"{n} layer(s): {weight_bytes(src) / 1e9:.2f} GB bf16; experts per layer "
              f"{[s for name, s in shapes if 'experts' in name]}", flush=True)
        warm(src)
        rows.append(copy_row(src, args.work, n))
        for dev in devices:
            rows.append(qstream_row(src, args.work, n, dev))
        if peer and n in peer_layers:
            rows.append(peer_row(src, args.work, n, args.lcvenv))
        for r in rows:
            if r.layers == n and "out" in r.extra and not r.note.startswith("FAILED"):
                r.rel_error = expert_rel_error(src, Path(r.extra["out"]))
        outs = [Path(r.extra["out"]) for r in rows if r.layers == n and r.case.startswith("qstream") and "out" in r.extra]
        if len(outs) == 2:
            same = same_outputs(*outs, skip=(REPORT_NAME, CARD_NAME))  # the card names its directory
            for r in rows[-len(devices) - 1:]:
                if r.case.startswith("qstream") and r.layers == n:
                    r.note = f"cpu/cuda outputs (but report and card) {'byte-identical' if same else 'DIFFER'}"
        print(f"done {n} layer(s)", flush=True)
    kernel = [] if args.no_kernel else bench_kernels.cpu_rows()
    if not args.no_kernel and torch.cuda.is_available():
        kernel += bench_kernels.cuda_rows(sweep=False)[0]
    growth = growth_lines(rows)
    print()
    print_table(rows, kernel, growth)
    if args.json:
        args.json.write_text(json.dumps({"device": device_line(), "versions": versions(args.lcvenv if peer else None),
                                         "rows": [asdict(r) | {"gbps": r.gbps} for r in rows], "kernel": kernel,
                                         "growth": growth}, indent=1, default=str))


if __name__ == "__main__":
    main()
