"""Loads the compiled extension esta_kernels._C, which registers the C++ (and CUDA) kernels.

Policy when it is missing: importing esta_kernels still works, `available_backends()` leaves out `cpu`
and `cuda`, `backend="auto"` falls back to the `torch` reference (or `triton` on a GPU), and ONE warning
says how to build it. Asking for `backend="cpu"` or `"cuda"` then raises an error with the same advice.
"""
from __future__ import annotations

import warnings

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the esta repository "
    "(needs a C++ compiler and ninja; set ESTA_BUILD_CUDA=1 for the CUDA kernels)"
)

# The schemas of the C++ operators, defined here and only here; the extension registers kernels for them
# (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda), fakes and autograd are registered in _ops.py and
# _lstsq_ops.py. Shapes and dtypes: docs/architecture.md ("The op contracts").
#   stitched_linear: x (M, K), weight (N, K), bias (N,), lora_a (r, K), lora_b (N, r), stitch_bias (S, N),
#     stitch_ids int64 of M elements or 1 (applied to every row). Returns y (M, N) in x's dtype and the LoRA
#     intermediate x @ lora_a.T (M, r) in float32 (float64 for float64 inputs); (M, 0) without LoRA.
#   stitched_linear_backward: gradients of x, lora_a, lora_b, stitch_bias, as output_mask asks (an output not
#     asked for is returned empty); dx in x's dtype, the three others float32 (float64 for float64 inputs).
#   lstsq_accumulate: one batch of the streaming least-squares init (esta_kernels/lstsq.py); h_in (n, d_in),
#     h_out (n, d_out) of any float dtype, shifts (blocks, d) with one row per block of 1024 rows, or (d,);
#     returns gram = [u, 1].T @ [u, 1] and cross = [u, 1].T @ v in float64 (u, v: the centred rows).
SCHEMAS = {
    "stitched_linear": "stitched_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_a, Tensor? lora_b, "
                       "Tensor? stitch_bias, Tensor? stitch_ids, float scale) -> (Tensor, Tensor)",
    "stitched_linear_backward": "stitched_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? lora_a, "
                                "Tensor? lora_b, Tensor lora_xa, Tensor? stitch_ids, int num_stitches, float scale, "
                                "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
    "lstsq_accumulate": "lstsq_accumulate(Tensor h_in, Tensor h_out, Tensor shift_in, Tensor shift_out) "
                        "-> (Tensor, Tensor)",
}
_LIB = torch.library.Library("esta", "DEF")  # kept alive for the process: the definitions live as long as it
for _schema in SCHEMAS.values():
    _LIB.define(_schema)

try:
    from esta_kernels import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY_IMPL kernel registrations)

    HAS_EXTENSION = True
    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    HAS_EXTENSION = False
    EXTENSION_ERROR = str(exc)
    warnings.warn(
        f"esta_kernels._C is not built ({exc}); the C++ backends are unavailable and `auto` falls back "
        f"to the torch reference. To use them, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


# Read once at import: the dispatcher query cannot be traced by torch.compile.
_HAS_CPU = HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("esta::stitched_linear", "CPU")
_HAS_CUDA = HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("esta::stitched_linear", "CUDA")


def has_cpu_kernels() -> bool:
    return _HAS_CPU


def has_cuda_kernels() -> bool:
    """Whether the extension was built with CUDA kernels (whether or not a GPU is present)."""
    return _HAS_CUDA
