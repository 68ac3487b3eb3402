"""Measuring quality: text sources, models loaded with qstream's decoding, windows and scores."""
