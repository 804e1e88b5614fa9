"""Triton GPU kernels (see kernels)."""
