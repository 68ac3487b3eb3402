"""Calibration: activation statistics of quantizable weights, measured through the streaming engine (issue 13)."""
