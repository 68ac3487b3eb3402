"""TEST-ONLY: the part every CPU stand-in kernel shares (tests_vllm/mxfp4_cpu.py, fp8_cpu.py).

A stand-in is chosen by vLLM on CPUs only, for any layer; at load it decodes the layer's quantized
parameters into one dense `weight` and then runs vLLM's own unquantized Linear, the GEMM a bf16
checkpoint gets.
"""

from __future__ import annotations

import torch


class DequantKernel:
    """Mixin before a vLLM kernel base class; subclasses say how to decode a layer (`decode`)."""

    @classmethod
    def is_supported(cls, compute_capability=None):
        from vllm.platforms import current_platform

        return current_platform.is_cpu(), "CPU only"

    @classmethod
    def can_implement(cls, config):
        return True, None

    def decode(self, layer: torch.nn.Module) -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer):
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod

        self.decode(layer)
        self.dense = UnquantizedLinearMethod()
        self.dense.process_weights_after_loading(layer)

    def apply_weights(self, layer, x, bias=None, **kwargs):
        return self.dense.apply(layer, x, bias)
