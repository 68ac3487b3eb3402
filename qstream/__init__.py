"""qstream: stream MoE checkpoints into vLLM-ready MXFP4 and measure what it cost."""

__version__ = "0.1.0"
