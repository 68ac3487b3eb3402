"""`qstream verify --source` and `quantize` against `cp -r`, on the Qwen3.5-35B-shaped synthetic checkpoints.

For the lead, one device call (H200; builds syn-1/2/4 under --work first, ~18 GB; verify --full left out):

    python bench/bench_verify.py --layers 1,2,4 --devices cpu,cuda --no-full --work /tmp/qsb --json $OUT/verify.json
    # before/after in the same run: add --baseline DIR (a checkout of the code before, e.g. `git worktree add`);
    # --cold evicts the source from the page cache before each copy and quantize row

The questions (issue 15): is the source check as fast as the conversion it checks (target: within 1.5x of
quantize's time on the same checkpoint and machine)? Does quantize run at the speed of the disk (targets: >= 80%
of `cp -r` speed in wall time on the H200, 4 layers; >= 60% on 2 cores)? For each layer count and device, one at
a time on the same warm page cache:
  copy            `cp -r SRC` (the I/O floor)
  quantize        `python -m qstream quantize SRC DST --device D` (experts preset, mse3)
  quantize (base) the same with the qstream of --baseline DIR, for before/after in one run
  verify          `verify(DST, SRC, device=D)`: the fast kernels, audited on a sample by the torch path
  verify --full   the torch path on every block (cut off after --full-timeout seconds; --no-full skips it)
Each row gives wall seconds of the child process (process start, imports, CUDA/Triton start included) and its
own seconds (process start excluded; quantize: its report's; verify: the verify() call, timed inside the child
after torch and the device are up), their ratio to quantize's, the share of `cp -r`'s speed (cp wall / wall),
and peak RSS (VmHWM). A second table splits each quantize run's wall time (PHASES): the interpreter's start (to
timed_cli.py's first line), imports and planning (to the run's own clock start), its own seconds, after the report
(verify_written, the card, the summary line, atexit handlers) and the exit (interpreter and torch teardown).

    nice -n 10 python bench/bench_verify.py                    # 1 layer, cpu (and cuda when present)
    python bench/bench_verify.py --layers 1,2 --devices cuda --json out.json
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

from bench_quantize import device_line, ensure_checkpoint, versions, warm, weight_bytes  # noqa: E402
from common import _memory, evict  # noqa: E402


@dataclass
class Row:
    case: str
    layers: int
    device: str
    wall: float = float("nan")  # process start included
    own: float = float("nan")  # process start excluded
    peak_rss: int = 0
    cpu: float = float("nan")  # user + system seconds of the child
    note: str = ""
    round: int = 0  # rows of one round (a copy, then quantize) are compared with each other
    stages: str = ""  # quantize: its report's stage clock (seconds)
    phases: dict[str, float] = field(default_factory=dict)  # quantize: where its wall time went (the docstring)


def run(cmd: list[str], log: Path, timeout: float | None = None, root: Path = ROOT,
        env: dict[str, str] | None = None) -> tuple[float, int, int | None, float]:
    """(wall seconds, peak RSS bytes, exit code or None if cut off at `timeout`, CPU seconds: user + system) of
    one child process, running the qstream found at `root`. CPU seconds vary less than wall on a shared machine."""
    env = dict(os.environ, **(env or {}), PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    peak = 0
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        while True:
            peak = max(peak, _memory(proc.pid)[0])
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return time.perf_counter() - t0, peak, proc.returncode, usage.ru_utime + usage.ru_stime
            if timeout is not None and time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                return time.perf_counter() - t0, peak, None, float("nan")
            time.sleep(0.05)


def copy_row(src: Path, work: Path, n: int) -> Row:
    dst = work / f"out-copy-{n}"
    subprocess.run(["rm", "-rf", str(dst)], check=True)
    wall, rss, rc, cpu = run(["cp", "-r", str(src), str(dst)], work / f"copy-{n}.log")
    subprocess.run(["rm", "-rf", str(dst)], check=True)
    return Row("cp -r", n, "-", wall, wall, rss, cpu, "" if rc == 0 else f"rc={rc}, see {work}/copy-{n}.log")


def quantize_row(src: Path, dst: Path, work: Path, n: int, dev: str, baseline: Path | None = None) -> Row:
    """`qstream quantize` of this checkout, or (`baseline`) of the checkout at that path."""
    cmd = [sys.executable, str(BENCH / "timed_cli.py"), "quantize", str(src), str(dst), "--device", dev,
           "--no-progress"]
    tag = f"quantize{'-base' if baseline else ''}-{dev}-{n}"
    marks = work / f"{tag}.marks.json"
    marks.unlink(missing_ok=True)
    subprocess.run(["rm", "-rf", str(dst)], check=True)  # as for cp -r: removing the last output is not timed
    spawned = time.time()
    wall, rss, rc, cpu = run(cmd, work / f"{tag}.log", root=baseline or ROOT, env={"QSTREAM_BENCH_MARKS": str(marks)})
    ended = spawned + wall
    row = Row("quantize (base)" if baseline else "quantize", n, dev, wall, float("nan"), rss, cpu)
    if rc:
        row.note = f"FAILED rc={rc}, see {work}/{tag}.log"
    else:
        report = dst / "qstream_report.json"
        totals = json.loads(report.read_text())["totals"]
        row.own = totals["seconds"]
        row.stages = ", ".join(f"{k} {v:.2f}" for k, v in totals["stages"].items() if v >= 0.01)
        m = json.loads(marks.read_text())
        reported = report.stat().st_mtime
        row.phases = {"interpreter": m["script"] - spawned, "imports and plan": reported - row.own - m["script"],
                      "own": row.own, "after report": m["returned"] - reported, "exit": ended - m["returned"]}
    return row


def same_shards(base: Path, dst: Path) -> str:
    """Whether two outputs hold the same shard files, byte for byte."""
    names = sorted(p.name for p in dst.glob("*.safetensors"))
    if names != sorted(p.name for p in base.glob("*.safetensors")):
        return "shard files differ from base"
    same = all(filecmp.cmp(base / n, dst / n, shallow=False) for n in names)
    return "shards = base" if same else "SHARD BYTES DIFFER from base"


def verify_row(src: Path, dst: Path, work: Path, n: int, dev: str, full: bool, timeout: float | None) -> Row:
    tag = f"verify{'-full' if full else ''}-{dev}-{n}"
    result = work / f"{tag}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__)), "--child", str(src), str(dst), dev, "full" if full else "fast",
           str(result)]
    wall, rss, rc, cpu = run(cmd, work / f"{tag}.log", timeout)
    row = Row(f"verify --source{' --full' if full else ''}", n, dev, wall, float("nan"), rss, cpu)
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
          f"| {'GB/s wall':>9} | {'of cp':>5} | {'cpu s':>6} | {'peak RSS':>8} | note")
    print("|" + "-" * 147)
    for r in rows:
        q = next((x for x in rows if x.case == "quantize" and x.round == r.round), None)
        cp = next(x for x in rows if x.case == "cp -r" and x.round == r.round)
        ratio = f"{r.wall / q.wall:.2f} / {r.own / q.own:.2f}" if q and r.case != "cp -r" else "-"
        print(f"| {r.case:<22} | {r.layers:>6} | {r.device:<6} | {r.wall:7.1f} | {r.own:7.1f} | {ratio:>21} "
              f"| {size[r.layers] / r.wall / 1e9:9.3f} | {cp.wall / r.wall:5.0%} | {r.cpu:6.1f} "
              f"| {r.peak_rss / 2**20:5.0f} MiB | {'; '.join(x for x in (r.note, r.stages) if x)}")


def print_phases(rows: list[Row]) -> None:
    """Where each quantize run's wall time went: see PHASES."""
    timed = [r for r in rows if r.phases]
    if not timed:
        return
    names = list(timed[0].phases)
    print(f"\n| {'quantize: wall s by phase':<26} | round | " + " | ".join(f"{n:>16}" for n in names) + " |   wall |")
    for r in timed:
        print(f"| {r.case + ' ' + r.device + ' ' + str(r.layers) + 'L':<26} | {r.round:>5} | "
              + " | ".join(f"{r.phases[n]:16.2f}" for n in names) + f" | {r.wall:6.2f} |")


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
    ap.add_argument("--baseline", type=Path, help="also time quantize with the qstream of this checkout (before)")
    ap.add_argument("--repeat", type=int, default=1, help="time copy and quantize this many times, interleaved")
    ap.add_argument("--cold", action="store_true",
                    help="evict the source from the page cache before each copy and quantize (verify stays warm)")
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
        cold = evict if args.cold else lambda _: None
        for dev in devices:
            dst = args.work / f"out-verify-{dev}-{n}"
            for _ in range(args.repeat):  # interleaved, so a change in the machine's load hits all alike
                rnd = rows[-1].round + 1 if rows else 1
                cold(src)
                rows.append(copy_row(src, args.work, n))
                if args.baseline:
                    cold(src)
                    rows.append(quantize_row(src, args.work / f"out-base-{dev}-{n}", args.work, n, dev,
                                             args.baseline))
                    print(rows[-1], flush=True)
                cold(src)
                rows.append(quantize_row(src, dst, args.work, n, dev))
                if args.baseline and not rows[-1].note:
                    rows[-1].note = same_shards(args.work / f"out-base-{dev}-{n}", dst)
                print(rows[-1], flush=True)
                for r in rows:
                    r.round = r.round or rnd
            if rows[-1].note not in ("", "shards = base"):
                continue
            warm(src)
            for full in [False] if args.no_full else [False, True]:
                rows.append(verify_row(src, dst, args.work, n, dev, full, args.full_timeout if full else None))
                rows[-1].round = rnd
                print(rows[-1], flush=True)
    print()
    print_table(rows, size)
    print_phases(rows)
    if args.json:
        args.json.write_text(json.dumps({"device": device_line(), "versions": versions(None),
                                         "bytes": size, "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
