"""Numerical kernels behind the stages: fused numba passes, tiled FFT convolution, Lanczos.

Private to apdask: stages call them; users call the stages.
"""
