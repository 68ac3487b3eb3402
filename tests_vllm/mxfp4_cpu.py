"""TEST-ONLY: let vLLM run MXFP4 checkpoints on a CPU by decoding them to bf16 at load (W4A16).

vLLM registers no MXFP4 kernel for CPUs. Everything before the GEMM is vLLM's own and runs unchanged:
config parsing, scheme choice, MXFP4 parameter creation, every weight loader, the expert mapping. Only
after loading do these stand-ins decode `weight_packed`/`weight_scale` (by qstream's decoder, which is
independent of compressed-tensors) and hand the bf16 weights to vLLM's unquantized Linear and MoE paths,
which is what Marlin computes on Hopper: W4A16. So vLLM's output on an MXFP4 checkpoint must then equal,
bit for bit, its output on the same checkpoint decompressed to bf16 by compressed-tensors.

Never import this outside tests: `install()` patches vLLM's kernel tables in the current process.
"""

from __future__ import annotations

import torch
from torch.nn import Parameter

from qstream.format.mxfp4 import dequantize
from tests_vllm.standin import DequantKernel


def _decode_into(layer: torch.nn.Module, prefix: str, dtype: torch.dtype) -> None:
    """Replace `<prefix>weight` (packed, as vLLM's MXFP4 scheme renames it) or `<prefix>weight_packed`,
    and `<prefix>weight_scale`, by one dense `<prefix>weight`."""
    packed_name = f"{prefix}weight_packed" if hasattr(layer, f"{prefix}weight_packed") else f"{prefix}weight"
    weight = dequantize(getattr(layer, packed_name).data, getattr(layer, f"{prefix}weight_scale").data, dtype)
    delattr(layer, packed_name)
    delattr(layer, f"{prefix}weight_scale")
    layer.register_parameter(f"{prefix}weight", Parameter(weight.contiguous(), requires_grad=False))


def install() -> None:
    """Register the CPU stand-ins for vLLM's MXFP4 linear kernel and MXFP4 MoE method."""
    from vllm.model_executor.kernels import linear as kernels
    from vllm.model_executor.kernels.linear.mxfp4 import MxFp4LinearKernel
    from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        CompressedTensorsMoEMethod,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w4a4_mxfp4 as mxfp4_moe,
    )
    from vllm.platforms import current_platform

    class DequantMxfp4LinearKernel(DequantKernel, MxFp4LinearKernel):
        """Decode at load, then vLLM's unquantized Linear (same GEMM as a bf16 checkpoint gets)."""

        def decode(self, layer):
            _decode_into(layer, "", layer.params_dtype)

    class DequantMxfp4MoEMethod(UnquantizedFusedMoEMethod):
        """vLLM's MXFP4 expert parameters and loaders; at load, decode and run vLLM's unquantized MoE."""

        def __init__(self, moe):
            super().__init__(moe)
            self.mxfp4 = mxfp4_moe.CompressedTensorsW4A4Mxfp4MoEMethod(moe)

        def create_weights(self, layer, *args, **kwargs):
            self.mxfp4.create_weights(layer, *args, **kwargs)

        def process_weights_after_loading(self, layer):
            for w in ("w13_", "w2_"):
                _decode_into(layer, w, layer.params_dtype)
            super().process_weights_after_loading(layer)

    cpu = current_platform._enum
    kernels._POSSIBLE_MXFP4_KERNELS.setdefault(cpu, []).append(DequantMxfp4LinearKernel)
    real = CompressedTensorsMoEMethod.get_moe_method

    def get_moe_method(quant_config, layer, layer_name):
        method = real(quant_config, layer, layer_name)
        if isinstance(method, mxfp4_moe.CompressedTensorsW4A4Mxfp4MoEMethod):
            return DequantMxfp4MoEMethod(layer.moe_config)
        return method

    CompressedTensorsMoEMethod.get_moe_method = staticmethod(get_moe_method)
