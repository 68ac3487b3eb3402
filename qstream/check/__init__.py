"""Checks of a written checkpoint: `qstream verify` and vLLM's own judgement (`verify --vllm`)."""
