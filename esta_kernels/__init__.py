"""esta_kernels: fused kernels for Efficient Stitchable Task Adaptation.

    esta_kernels.stitched_linear(x, weight, bias, lora_a, lora_b, stitch_bias, stitch_ids, *, scale, backend)
    esta_kernels.StreamingLstsq(in_features, out_features, bias, device, backend=...)  .update() / .solve()
    esta_kernels.lstsq_init(h_in, h_out, ridge)            the least-squares stitching init, one shot
    esta_kernels.lstsq_accumulate(h_in, h_out, shift_in, shift_out, backend=...)   its fused op
    esta_kernels.available_backends()
"""
from esta_kernels import _ext, _lstsq_ops, _ops  # noqa: F401  (registers the operators)
from esta_kernels.backends import available_backends, resolve_backend
from esta_kernels.lstsq import MultiTargetLstsq, StreamingLstsq, lstsq_accumulate, lstsq_init
from esta_kernels.reference import naive_stitched_linear, torch_lstsq_accumulate, torch_stitched_linear
from esta_kernels.stitched_linear import stitched_linear

__version__ = "0.1.0"

__all__ = [
    "MultiTargetLstsq",
    "StreamingLstsq",
    "available_backends",
    "lstsq_accumulate",
    "lstsq_init",
    "naive_stitched_linear",
    "resolve_backend",
    "stitched_linear",
    "torch_lstsq_accumulate",
    "torch_stitched_linear",
]
