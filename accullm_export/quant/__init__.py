"""Pure NumPy quantization math: symmetric integer grids, blocked scales, error metrics."""
