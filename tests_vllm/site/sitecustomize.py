"""Test venv only (scripts/test-vllm puts this directory on PYTHONPATH, so vLLM's subprocesses get it too).

PyPI's torchvision is a CUDA build: beside CPU torch its C ops never register, and `import torchvision`
dies registering fake kernels for two of them ("operator torchvision::nms does not exist"). vLLM's
Qwen3.5 model file imports it through transformers' image processors. Declaring those two op schemas
lets the import through; nothing here calls them.
"""

import torch

_torchvision = torch.library.Library("torchvision", "FRAGMENT")
for _op in ("nms", "qnms"):
    _torchvision.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
