"""Fused kernels for ZeRO hot paths (Triton on CUDA, torch references elsewhere).

The kernels themselves are tracked in their own issue; this package is installed with
hf_zero so the engine can import it without a build step.
"""
