"""TEST-ONLY: let vLLM run compressed-tensors FP8 (block, channel, tensor) and MXFP8 layers on any CPU by
decoding them to the layer's dtype at load (W8A16 by dequantization), as tests_vllm/mxfp4_cpu.py does for MXFP4.

vLLM's own code runs unchanged up to the GEMM: config parsing, per-layer scheme choice (CompressedTensorsW8A8Fp8,
W8A16Fp8, W8A8Mxfp8), their `create_weights` and every weight loader, fused q/k/v and gate/up shards included.
The stand-in kernels go first in vLLM's CPU kernel tables, so vLLM picks them with or without AMX. At load they
decode the raw checkpoint tensors as compressed-tensors does (float32 weight times float32 scale, cast once;
MXFP8: times 2^(e8m0 - 127) per 32) and hand the dense weight to vLLM's unquantized Linear. vLLM's output on a
mixed checkpoint must then equal, bit for bit, its output on the same checkpoint decoded by compressed-tensors.

This is not what a GPU computes (Hopper runs W8A8 with FP8 activations); it tests loading, not FP8 numerics.
Never import this outside tests: `install()` patches vLLM's kernel tables and two schemes in this process.
"""

from __future__ import annotations

import torch
from torch.nn import Parameter

from tests_vllm.standin import DequantKernel

MXFP8_BLOCK = 32


def decode_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: list[int] | None = None,
               widths: list[int] | None = None) -> torch.Tensor:
    """FP8 weight [N, K] times its scale, in float32, cast once to dtype. scale: uint8 [N, K/32] (MXFP8),
    a block grid [ceil(N/bn), ceil(K/bk)], [N, 1] (channel), or one per fused shard of `widths` rows (tensor)."""
    w = weight.to(torch.float32)
    n, k = w.shape
    if scale.dtype == torch.uint8:
        s = torch.exp2(scale[:n, : k // MXFP8_BLOCK].to(torch.float32) - 127.0).repeat_interleave(MXFP8_BLOCK, 1)
    elif block is not None:
        s = scale.float().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    elif scale.numel() == n:
        s = scale.float().reshape(n, 1)
    else:
        rows = widths if scale.numel() > 1 else [n]
        s = torch.cat([scale.float().reshape(-1)[i].expand(r) for i, r in enumerate(rows)]).reshape(n, 1)
    return (w * s).to(dtype)


def _to_dense(layer: torch.nn.Module) -> None:
    """Replace the layer's FP8 weight and its scales by one dense `weight`."""
    dtype = getattr(layer, "orig_dtype", None) or getattr(layer, "params_dtype", torch.bfloat16)
    scale = layer.weight_scale if getattr(layer, "weight_scale", None) is not None else layer.weight_scale_inv
    dense = decode_fp8(layer.weight.data, scale.data, dtype, getattr(layer, "weight_block_size", None),
                       getattr(layer, "logical_widths", None))
    for name in ("weight", "weight_scale", "weight_scale_inv", "input_scale"):
        if name in layer._parameters:
            del layer._parameters[name]
        elif hasattr(layer, name):
            delattr(layer, name)
    layer.register_parameter("weight", Parameter(dense.contiguous(), requires_grad=False))
    layer.input_scale = None


def install() -> None:
    """Register the CPU stand-ins for vLLM's FP8 and MXFP8 linear kernels."""
    from vllm.model_executor.kernels import linear as kernels
    from vllm.model_executor.kernels.linear.mxfp8.Mxfp8LinearKernel import Mxfp8LinearKernel
    from vllm.model_executor.kernels.linear.scaled_mm.BlockScaledMMLinearKernel import Fp8BlockScaledMMLinearKernel
    from vllm.model_executor.kernels.linear.scaled_mm.ScaledMMLinearKernel import FP8ScaledMMLinearKernel
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        CompressedTensorsW8A8Fp8,
        CompressedTensorsW8A16Fp8,
    )
    from vllm.platforms import current_platform

    class Dequant(DequantKernel):
        """Decode at load, then vLLM's unquantized Linear (the GEMM a bf16 checkpoint gets)."""

        def input_quant_key(self):
            return None  # bf16 activations: nothing upstream may quantize them

        def decode(self, layer):
            _to_dense(layer)

        def apply_scaled_mm(self, *args, **kwargs):  # abstract in the base; apply_weights never calls it
            raise NotImplementedError

        def apply_block_scaled_mm(self, *args, **kwargs):  # abstract in the base; apply_weights never calls it
            raise NotImplementedError

    class DequantFp8BlockKernel(Dequant, Fp8BlockScaledMMLinearKernel):
        pass

    class DequantFp8Kernel(Dequant, FP8ScaledMMLinearKernel):
        pass

    class DequantMxfp8Kernel(Dequant, Mxfp8LinearKernel):
        pass

    cpu = current_platform._enum
    for table, cls in ((kernels._POSSIBLE_FP8_BLOCK_KERNELS, DequantFp8BlockKernel),
                       (kernels._POSSIBLE_FP8_KERNELS, DequantFp8Kernel),
                       (kernels._POSSIBLE_WFP8A16_KERNELS, DequantFp8Kernel),
                       (kernels._POSSIBLE_MXFP8_KERNELS, DequantMxfp8Kernel)):
        table.setdefault(cpu, []).insert(0, cls)

    # Channel and tensor schemes rewrite the raw tensors (transpose, requantize fused shards to one scale)
    # before their kernel sees them; with a stand-in kernel, decode the raw tensors instead.
    for scheme_cls, attr in ((CompressedTensorsW8A8Fp8, "fp8_linear"), (CompressedTensorsW8A16Fp8, "linear_kernel")):
        real = scheme_cls.process_weights_after_loading

        def process_weights_after_loading(self, layer, _real=real, _attr=attr):
            kernel = getattr(self, _attr, None)
            if isinstance(kernel, Dequant):
                kernel.process_weights_after_loading(layer)
            else:
                _real(self, layer)

        scheme_cls.process_weights_after_loading = process_weights_after_loading
