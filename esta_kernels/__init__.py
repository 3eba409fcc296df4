"""esta_kernels: fused kernels for Efficient Stitchable Task Adaptation.

    esta_kernels.stitched_linear(x, weight, bias, lora_a, lora_b, stitch_bias, stitch_ids, *, scale, backend)
    esta_kernels.available_backends()
"""
from esta_kernels import _ext, _ops  # noqa: F401  (registers the operators)
from esta_kernels.backends import available_backends, resolve_backend
from esta_kernels.reference import naive_stitched_linear, torch_stitched_linear
from esta_kernels.stitched_linear import stitched_linear

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "naive_stitched_linear",
    "resolve_backend",
    "stitched_linear",
    "torch_stitched_linear",
]
