"""`qstream verify --source` against `quantize` and `cp -r`, on the Qwen3.5-35B-shaped synthetic checkpoints.

The question (issue 15): is the source check as fast as the conversion it checks (target: within 1.5x of
quantize's time on the same checkpoint and machine)? For each layer count and device, one at a time on the
same warm page cache:
  copy            `cp -r SRC` (the I/O floor)
  quantize        `python -m qstream quantize SRC DST --device D` (experts preset, mse3)
  verify          `verify(DST, SRC, device=D)`: the fast kernels, audited on a sample by the torch path
  verify --full   the torch path on every block (cut off after --full-timeout seconds; --no-full skips it)
Each row gives wall seconds of the child process (process start, imports, CUDA/Triton start included) and its
own seconds (quantize: its report's; verify: the verify() call, timed inside the child after torch and the
device are up), their ratio to quantize's, and peak RSS (VmHWM).

    nice -n 10 python bench/bench_verify.py                    # 1 layer, cpu (and cuda when present)
    python bench/bench_verify.py --layers 1,2 --devices cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import qstream_cmd, run_child, run_reported  # first: the repository on sys.path

from bench_quantize import device_line, ensure_checkpoint, versions, warm, weight_bytes


@dataclass
class Row:
    case: str
    layers: int
    device: str
    wall: float = float("nan")  # process start included
    own: float = float("nan")  # process start excluded
    peak_rss: int = 0
    note: str = ""


def copy_row(src: Path, work: Path, n: int) -> Row:
    dst = work / f"out-copy-{n}"
    subprocess.run(["rm", "-rf", str(dst)], check=True)
    wall, rss, rc = run_child(["cp", "-r", str(src), str(dst)], work / f"copy-{n}.log")
    subprocess.run(["rm", "-rf", str(dst)], check=True)
    return Row("cp -r", n, "-", wall, wall, rss, "" if rc == 0 else f"rc={rc}")


def quantize_row(src: Path, dst: Path, work: Path, n: int, dev: str) -> Row:
    run = run_reported(qstream_cmd("quantize", str(src), str(dst), "--device", dev, "--no-progress", "--overwrite"),
                       dst, work / f"quantize-{dev}-{n}.log")
    own = float("nan") if run.report is None else run.report["totals"]["seconds"]
    return Row("quantize", n, dev, run.wall, own, run.peak_rss, run.note)


def verify_row(src: Path, dst: Path, work: Path, n: int, dev: str, full: bool, timeout: float | None) -> Row:
    tag = f"verify{'-full' if full else ''}-{dev}-{n}"
    result = work / f"{tag}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__)), "--child", str(src), str(dst), dev, "full" if full else "fast",
           str(result)]
    wall, rss, rc = run_child(cmd, work / f"{tag}.log", timeout)
    row = Row(f"verify --source{' --full' if full else ''}", n, dev, wall, float("nan"), rss)
    if rc is None:
        row.note = f"cut off after {timeout:.0f} s"
    elif not result.exists():
        row.note = f"FAILED rc={rc}, see {work}/{tag}.log"
    else:
        got = json.loads(result.read_text())
        row.own = got["seconds"]
        row.note = ("OK" if got["ok"] else "FAILED") + f"; {got['detail']}"
    return row


def child(src: str, dst: str, dev: str, mode: str, result: str) -> None:
    """Time verify() in this process once torch and the device are up; write seconds, verdict and detail."""
    import torch

    from qstream.check.verify import verify

    if dev == "cuda":
        torch.cuda.init()
    t0 = time.perf_counter()
    report = verify(Path(dst), Path(src), device=dev, full=mode == "full")
    seconds = time.perf_counter() - t0
    detail = next(c.detail for c in report.checks if c.name == "error bound")
    Path(result).write_text(json.dumps({"seconds": seconds, "ok": report.ok, "detail": detail,
                                        "failures": report.failures[:5]}))


def print_table(rows: list[Row], size: dict[int, int]) -> None:
    print(f"| {'case':<22} | layers | device | {'wall s':>7} | {'own s':>7} | {'x quantize (wall/own)':>21} "
          f"| {'GB/s wall':>9} | {'peak RSS':>8} | note")
    print("|" + "-" * 130)
    for r in rows:
        q = next((x for x in rows if x.case == "quantize" and x.layers == r.layers and x.device == r.device), None)
        ratio = f"{r.wall / q.wall:.2f} / {r.own / q.own:.2f}" if q and r.case != "cp -r" else "-"
        print(f"| {r.case:<22} | {r.layers:>6} | {r.device:<6} | {r.wall:7.1f} | {r.own:7.1f} | {ratio:>21} "
              f"| {size[r.layers] / r.wall / 1e9:9.3f} | {r.peak_rss / 2**20:5.0f} MiB | {r.note}")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:7])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="1", help="comma-separated layer counts (default 1)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qstream-bench"), help="checkpoints and outputs go here")
    ap.add_argument("--devices", default="auto", help="auto (cpu, plus cuda if present), or e.g. cuda")
    ap.add_argument("--no-full", action="store_true", help="skip verify --full (the torch path on every block)")
    ap.add_argument("--full-timeout", type=float, default=900, help="cut verify --full off after this many seconds")
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args()

    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    devices = (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]) if args.devices == "auto" \
        else args.devices.split(",")
    print(device_line())
    print(versions(None), flush=True)
    rows: list[Row] = []
    size: dict[int, int] = {}
    for n in (int(x) for x in args.layers.split(",")):
        src = ensure_checkpoint(args.work, n)
        size[n] = weight_bytes(src)
        print(f"{n} layer(s): {size[n] / 1e9:.2f} GB bf16", flush=True)
        warm(src)
        rows.append(copy_row(src, args.work, n))
        for dev in devices:
            dst = args.work / f"out-verify-{dev}-{n}"
            rows.append(quantize_row(src, dst, args.work, n, dev))
            print(rows[-1], flush=True)
            if rows[-1].note:
                continue
            rows.append(verify_row(src, dst, args.work, n, dev, False, None))
            print(rows[-1], flush=True)
            if not args.no_full:
                rows.append(verify_row(src, dst, args.work, n, dev, True, args.full_timeout))
                print(rows[-1], flush=True)
    print()
    print_table(rows, size)
    if args.json:
        args.json.write_text(json.dumps({"device": device_line(), "versions": versions(None),
                                         "bytes": size, "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
