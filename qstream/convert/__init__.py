"""Carrying out a conversion: the streaming quantize pipeline and dequantize."""
