"""Calibration: activation statistics of quantizable weights, measured through the streaming engine (issue 13),
and the quantizers that use them (imatrix exponents)."""
