"""Benchmarks behind ``python -m bread_kernels.bench``: timings as ratios to a reference, with the device named."""
