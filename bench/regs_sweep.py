"""Register-pressure sweep of the Triton MSE3 kernel on CUDA: register cap x blocks/warps, each checked
byte-equal to the uncapped kernel and timed against the copy floor, with the registers and spills the
compiler reports. The kernel is latency-bound by registers (bench/NOTES.md).

    python bench/regs_sweep.py
"""

from __future__ import annotations

import sys

import torch
import triton

sys.path.insert(0, ".")
from bench.bench_kernels import EXPERT_SHAPE, weights  # noqa: E402
from qstream.format.kernels import triton_mxfp4 as T  # noqa: E402
from qstream.format.mxfp4 import BLOCK  # noqa: E402
from qstream.format.rules import Rule  # noqa: E402

CONFIGS = [(32, 1, reg) for reg in (None, 128, 144, 160, 168, 176)] + [
    (64, 2, None), (64, 2, 168), (32, 2, 128), (128, 4, 128)]


def compiled(w: torch.Tensor, blocks: int, warps: int, reg: int | None):
    """Launch once directly, to read the compiled kernel's register count and spills."""
    nblocks = w.numel() // BLOCK
    packed = torch.empty(w.numel() // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(nblocks, dtype=torch.uint8, device=w.device)
    programs = triton.cdiv(nblocks, blocks)
    stats = torch.empty(programs, 2, dtype=torch.float64, device=w.device)
    counts = torch.empty(programs, 4, dtype=torch.int64, device=w.device)
    return T._mxfp4_kernel[(programs,)](w.view(torch.int16), packed.view(torch.int32), scales, stats, counts, nblocks,
                                        RULE=Rule.MSE3.spec.code, BF16=True, BLOCKS=blocks, SKIP_R2=True, num_warps=warps,
                                        **({"maxnreg": reg} if reg else {}))


def main() -> None:
    w = weights(EXPERT_SHAPE, "cuda")
    x, y = torch.empty_like(w), torch.empty_like(w)
    copy = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    floor = copy * (2 + 0.5 + 1 / 32) / 4  # copy moves 4 bytes per element (read + write)
    ref = T.launch(w, Rule.MSE3, maxnreg=None)
    print(f"{torch.cuda.get_device_name()}: floor {floor:.3f} ms for {EXPERT_SHAPE}")
    for blocks, warps, reg in CONFIGS:
        try:
            k = compiled(w, blocks, warps, reg)
            out = T.launch(w, Rule.MSE3, blocks=blocks, num_warps=warps, maxnreg=reg)
            same = torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
            ms = triton.testing.do_bench(lambda: T.launch(w, Rule.MSE3, blocks=blocks, num_warps=warps, maxnreg=reg),
                                         warmup=25, rep=200, return_mode="median")
            print(f"blocks {blocks:3d} warps {warps} maxnreg {reg!s:4}: regs {k.n_regs:3d} "
                  f"spills {k.n_spills:3d}  {ms:.3f} ms  {100 * floor / ms:.1f}% of floor  bytes equal {same}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on with the sweep
            print(blocks, warps, reg, "failed:", str(exc)[:200], flush=True)


if __name__ == "__main__":
    main()
