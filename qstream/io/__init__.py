"""Checkpoint I/O: safetensors headers and rows, checkpoint directories, quantized inputs decoded, staging."""
