"""Calibration: streamed per-channel statistics of every linear layer's input, outlier selection, profiles."""
