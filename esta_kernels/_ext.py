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

try:
    from esta_kernels import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)

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


def define_schemas_without_extension() -> None:
    """Without the extension, define the same schemas from Python so fakes and autograd still register."""
    if HAS_EXTENSION or _LIBS:  # idempotent: each op module calls it before registering its fakes
        return
    lib = torch.library.Library("esta", "DEF")
    lib.define(
        "stitched_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_a, Tensor? lora_b, "
        "Tensor? stitch_bias, Tensor? stitch_ids, float scale) -> (Tensor, Tensor)"
    )
    lib.define(
        "stitched_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? lora_a, Tensor? lora_b, "
        "Tensor lora_xa, Tensor? stitch_ids, int num_stitches, float scale, bool[4] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    )
    lib.define("lstsq_accumulate(Tensor h_in, Tensor h_out, Tensor shift_in, Tensor shift_out) -> (Tensor, Tensor)")
    _LIBS.append(lib)


_LIBS: list = []
