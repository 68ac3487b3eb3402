"""Launch the Triton MSE3 kernel on one Qwen3.5 fused-expert tensor, for a profiler to look at.

    ncu -k regex:_mxfp4_kernel --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section WarpStateStats --section ComputeWorkloadAnalysis python3 bench/ncu_kernel.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_kernels import EXPERT_SHAPE, weights  # noqa: E402
from qstream.format.kernels import triton_mxfp4  # noqa: E402
from qstream.format.rules import Rule  # noqa: E402

w = weights(EXPERT_SHAPE, "cuda")
for _ in range(2):  # the first launch compiles
    triton_mxfp4.launch(w, Rule.MSE3)
torch.cuda.synchronize()
