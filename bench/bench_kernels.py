"""Kernel-only speed and bytes: torch path vs the C kernel on CPU; Triton vs the copy bandwidth on CUDA.

    python bench/bench_kernels.py            # CPU rows; CUDA rows too when a GPU is present
    python bench/bench_kernels.py --check    # also: large random tensors, every backend bit-identical
    python bench/bench_kernels.py --sweep    # CUDA: time every (blocks per program, warps) and keep the best

The GPU floor: each element reads 2 bytes (bf16) and writes 0.5 (codes) + 1/32 (scale) bytes; the
floor time is those bytes over the device-to-device copy bandwidth measured here (read + write).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qstream.format.kernels import cpu, triton_mxfp4  # noqa: E402
from qstream.format.mxfp4 import quantize  # noqa: E402
from qstream.format.rules import Rule

BYTES_PER_ELEMENT = 2 + 0.5 + 1 / 32  # bf16 in, packed codes + E8M0 scales out
EXPERT_SHAPE = (256, 1024, 2048)  # Qwen3.5-35B-A3B's fused gate_up_proj: 537 M elements, 1 GiB bf16


def weights(shape: tuple[int, ...], device: str, seed: int = 0) -> torch.Tensor:
    """N(0, 0.02) like real expert weights, with per-row scales spread over 2^-8..2^8 to vary exponents."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    w *= 0.02 * torch.exp2(torch.randint(-8, 9, (*shape[:-1], 1), generator=g, device=device).float())
    return w.to(torch.bfloat16)


def best_of(fn, repeat: int = 3) -> float:
    """Wall seconds of the fastest of `repeat` calls (CPU)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cpu_rows(torch_elements: int = 1 << 24, c_elements: int = 1 << 27) -> list[dict]:
    """Elements/s of the torch path and of the C kernel (all threads), MSE3 on bf16."""
    rows = []
    w = weights((torch_elements // 2048, 2048), "cpu")
    t = best_of(lambda: quantize(w, Rule.MSE3), repeat=1)
    rows.append({"case": "kernel torch mxfp4.quantize (cpu)", "elements": w.numel(), "seconds": t})
    try:
        cpu.library()
    except cpu.BuildError as exc:
        rows.append({"case": "kernel C (cpu)", "error": str(exc)})
        return rows
    w = weights((c_elements // 2048, 2048), "cpu")
    threads = torch.get_num_threads()
    t = best_of(lambda: cpu.quantize(w, Rule.MSE3, threads=threads))
    rows.append({"case": f"kernel C (cpu, {threads} threads)", "elements": w.numel(), "seconds": t})
    for row in rows:
        row["elements_per_s"] = row["elements"] / row["seconds"]
    return rows


def cuda_copy_bandwidth(numel: int) -> float:
    """Device-to-device copy, bytes read + written per second (median of do_bench)."""
    from triton.testing import do_bench

    src = torch.empty(numel, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def cuda_rows(sweep: bool) -> tuple[list[dict], dict]:
    """Triton kernel time on the fused expert shape vs the copy floor; optional config sweep."""
    from triton.testing import do_bench

    w = weights(EXPERT_SHAPE, "cuda")
    bw = cuda_copy_bandwidth(w.numel())
    floor_s = w.numel() * BYTES_PER_ELEMENT / bw
    configs = [(b, nw) for b in (32, 64, 128, 256) for nw in (1, 2, 4, 8) if b >= 32 * nw] if sweep else [
        (triton_mxfp4.BLOCKS_PER_PROGRAM, triton_mxfp4.NUM_WARPS)]
    timings = []
    for blocks, nw in configs:
        ms = do_bench(lambda: triton_mxfp4.launch(w, Rule.MSE3, blocks, nw), warmup=50, rep=300, return_mode="median")
        timings.append({"blocks": blocks, "num_warps": nw, "ms": ms, "floor_share": floor_s / (ms * 1e-3)})
    best = min(timings, key=lambda t: t["ms"])
    rows = []
    for rule in (Rule.MSE3, Rule.EVEN):
        ms = do_bench(lambda: triton_mxfp4.launch(w, rule, best["blocks"], best["num_warps"]),
                      warmup=50, rep=300, return_mode="median")
        rows.append({"case": f"kernel triton {rule.value} (cuda, {best['blocks']} blocks/{best['num_warps']} warps)",
                     "elements": w.numel(), "seconds": ms * 1e-3})
    ms = do_bench(lambda: triton_mxfp4.quantize(w, Rule.MSE3), warmup=50, rep=300, return_mode="median")
    rows.append({"case": "triton_mxfp4.quantize incl. stats sync (cuda)", "elements": w.numel(), "seconds": ms * 1e-3})
    small = w[:32]  # the torch path's temporaries would not fit for the whole tensor
    ms = do_bench(lambda: quantize(small, Rule.MSE3), warmup=50, rep=300, return_mode="median")
    rows.append({"case": "kernel torch mxfp4.quantize (cuda, eager)", "elements": small.numel(), "seconds": ms * 1e-3})
    for row in rows:
        row["elements_per_s"] = row["elements"] / row["seconds"]
        row["bytes_per_s"] = row["elements_per_s"] * BYTES_PER_ELEMENT
        row["floor_share"] = row["bytes_per_s"] / bw
    rows.append({"case": "copy d2d (cuda, bytes read+written)", "elements": w.numel(), "seconds": 4 * w.numel() / bw,
                 "elements_per_s": w.numel() * bw / (4 * w.numel()), "bytes_per_s": bw})
    info = {"copy_bytes_per_s": bw, "floor_ms": floor_s * 1e3, "sweep": timings, "best": best,
            "device": torch.cuda.get_device_name()}
    return rows, info


def check(device: str) -> list[str]:
    """Large random tensors: every backend here gives the same bytes and statistics."""
    lines = []
    w = weights(EXPERT_SHAPE, "cpu", seed=1)
    c = cpu.quantize(w, Rule.MSE3)
    lines.append(f"C kernel on {tuple(w.shape)}: offsets {c.offset_counts}")
    for dtype in (torch.float16, torch.float32):
        part = w[:8].to(dtype)
        a, b = cpu.quantize(part, Rule.MSE3), quantize(part, Rule.MSE3)
        same = torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales) and a.offset_counts == b.offset_counts
        lines.append(f"C vs torch path, {dtype} {tuple(part.shape)}: {'identical' if same else 'DIFFERENT'}")
    t = quantize(w[:16], Rule.MSE3)
    same = torch.equal(t.packed, c.packed[:16]) and torch.equal(t.scales, c.scales[:16])
    lines.append(f"C vs torch path, bf16 {tuple(w[:16].shape)}: {'identical' if same else 'DIFFERENT'}")
    if device == "cuda":
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            part = w if dtype is torch.bfloat16 else w[:64].to(dtype)
            ref = c if dtype is torch.bfloat16 else cpu.quantize(part, Rule.MSE3)
            g = triton_mxfp4.quantize(part.cuda(), Rule.MSE3)
            same = (torch.equal(g.packed.cpu(), ref.packed) and torch.equal(g.scales.cpu(), ref.scales)
                    and g.offset_counts == ref.offset_counts)
            rel = abs(g.sq_error / ref.sq_error - 1), abs(g.sq_norm / ref.sq_norm - 1)
            lines.append(f"triton (cuda) vs C, {dtype} {tuple(part.shape)}: {'identical' if same else 'DIFFERENT'}"
                         f"; stats rel diff {rel[0]:.1e}, {rel[1]:.1e}")
            del g
        g = quantize(w[:16].cuda(), Rule.MSE3)
        same = torch.equal(g.packed.cpu(), c.packed[:16]) and torch.equal(g.scales.cpu(), c.scales[:16])
        lines.append(f"torch path (cuda) vs C, bf16 {tuple(w[:16].shape)}: {'identical' if same else 'DIFFERENT'}")
    return lines


def fmt_rate(row: dict) -> str:
    if "error" in row:
        return f"{row['case']:<58} unavailable: {row['error']}"
    extra = f"  {row['bytes_per_s'] / 1e9:7.1f} GB/s" if "bytes_per_s" in row else ""
    extra += f"  {100 * row['floor_share']:5.1f}% of copy floor" if "floor_share" in row else ""
    return f"{row['case']:<58} {row['elements_per_s'] / 1e6:10.1f} M el/s{extra}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="bit-identity of all backends on large random tensors")
    ap.add_argument("--sweep", action="store_true", help="CUDA: time every blocks-per-program x warps config")
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and triton_mxfp4.available() else "cpu"
    print(f"torch {torch.__version__}, triton {getattr(triton_mxfp4.triton, '__version__', None)}, "
          f"{os.cpu_count()} CPUs, device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}", flush=True)
    out: dict = {}
    if args.check:
        out["check"] = check(device)
        print("\n".join(out["check"]), flush=True)
    out["cpu"] = cpu_rows()
    if device == "cuda":
        out["cuda"], out["cuda_info"] = cuda_rows(args.sweep)
        info = out["cuda_info"]
        if args.sweep:
            for t in sorted(info["sweep"], key=lambda t: t["ms"]):
                print(f"  blocks {t['blocks']:4d} warps {t['num_warps']}: {t['ms']:.3f} ms, {100 * t['floor_share']:.1f}% of floor")
        print(f"copy bandwidth {info['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write); floor for "
              f"{EXPERT_SHAPE} = {info['floor_ms']:.3f} ms")
    for row in out["cpu"] + out.get("cuda", []):
        print(fmt_rate(row))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
