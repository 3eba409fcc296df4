"""Triton kernels of esta (the `triton` backend). Importing this package does not import triton."""
