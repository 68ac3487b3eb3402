import torch, triton, sys
sys.path.insert(0, ".")
from bench.bench_kernels import EXPERT_SHAPE, weights
from qstream.kernels import triton_mxfp4 as T
from qstream.mxfp4 import Rule
w = weights(EXPERT_SHAPE, "cuda")
x = torch.empty_like(w); y = torch.empty_like(w)
copy = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
floor = copy * (2 + 0.5 + 1 / 32) / 4  # copy moves 4 bytes per element (read + write)
ref = T.launch(w, Rule.MSE3)
CONFIGS = [(32, 1, None)] + [(32, 1, r) for r in (144, 152, 160, 168, 176, 184, 200, 216)] + [(64, 2, 168), (32, 2, 168)]
for blocks, warps, reg in CONFIGS:
    try:
        out = T.launch(w, Rule.MSE3, blocks=blocks, num_warps=warps, maxnreg=reg)
        same = torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        ms = triton.testing.do_bench(lambda: T.launch(w, Rule.MSE3, blocks=blocks, num_warps=warps, maxnreg=reg), warmup=25, rep=200, return_mode="median")
        print(f"blocks {blocks} warps {warps} maxnreg {reg}: {ms:.3f} ms, {100 * floor / ms:.1f}% of floor, bytes equal {same}")
    except Exception as e:
        print(blocks, warps, reg, "failed", str(e)[:200])
