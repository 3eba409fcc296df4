"""torch.library registration of the least-squares accumulation op, and its argument checks.

    esta::lstsq_accumulate(h_in, h_out, shift_in, shift_out) -> (gram, cross)
        With b(m) = m // SHIFT_BLOCK_ROWS the block of row m, u[m] = h_in[m] - shift_in[b(m)],
        v[m] = h_out[m] - shift_out[b(m)] and ua = [u, 1]: gram = ua.T @ ua, cross = ua.T @ v in float64.
        The shifts are (blocks, d) with blocks = ceil(n / SHIFT_BLOCK_ROWS), one row per block, or (d,) for
        one shift for every row.
        C++ schema (csrc/ops.cpp); kernels per dispatch key: CPU (the `cpu` backend, csrc/cpu/lstsq.cpp)
        and CUDA (the `cuda` backend, csrc/cuda/).
    esta::lstsq_accumulate_triton
        A Python custom op launching the Triton kernel (esta_kernels/triton/lstsq.py): opaque, like
        esta::stitched_linear_triton, so the same op runs on CUDA and, under TRITON_INTERPRET=1, on CPU tensors.

The op is an init-time statistic computed under no_grad: no autograd formula is registered, so asking for a
gradient through it raises PyTorch's "autograd not implemented" error instead of returning a wrong one.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from esta_kernels import _ext
from esta_kernels.reference import SHIFT_BLOCK_ROWS

_ext.define_schemas_without_extension()

# Read once at import, like _ext.has_cpu_kernels(): an extension built before this op existed lacks it.
_HAS_CPU = _ext.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("esta::lstsq_accumulate", "CPU")
_HAS_CUDA = _ext.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("esta::lstsq_accumulate", "CUDA")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def has_cpu_kernel() -> bool:
    return _HAS_CPU


def has_cuda_kernel() -> bool:
    return _HAS_CUDA


def _fake_accumulate(h_in, h_out, shift_in, shift_out):
    da = h_in.shape[1] + 1
    return (h_in.new_empty((da, da), dtype=torch.float64), h_in.new_empty((da, h_out.shape[1]), dtype=torch.float64))


torch.library.register_fake("esta::lstsq_accumulate")(_fake_accumulate)


@torch.library.custom_op("esta::lstsq_accumulate_triton", mutates_args=())
def lstsq_accumulate_triton(h_in: Tensor, h_out: Tensor, shift_in: Tensor, shift_out: Tensor) -> Tuple[Tensor, Tensor]:
    from esta_kernels.triton.lstsq import triton_lstsq_accumulate

    return triton_lstsq_accumulate(h_in, h_out, shift_in, shift_out)


lstsq_accumulate_triton.register_fake(_fake_accumulate)

ACCUMULATE_OPS = {
    "cpu": torch.ops.esta.lstsq_accumulate,
    "cuda": torch.ops.esta.lstsq_accumulate,
    "triton": torch.ops.esta.lstsq_accumulate_triton,
}


def check_accumulate_args(h_in, h_out, shift_in, shift_out, backend: str) -> None:
    """The op's contract, checked before dispatch so every backend raises the same clear errors:
    ValueError for shapes and devices, TypeError for dtypes, each naming the argument."""
    op = "lstsq_accumulate"
    for name, t in (("h_in", h_in), ("h_out", h_out), ("shift_in", shift_in), ("shift_out", shift_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("h_in", h_in), ("h_out", h_out)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    shift_dtypes = (torch.float32,) if backend in ("triton", "cuda") else (torch.float32, torch.float64)
    for name, t in (("shift_in", shift_in), ("shift_out", shift_out)):
        if t.dtype not in shift_dtypes:
            allowed = " or ".join(_DTYPE_NAMES[d] for d in shift_dtypes)
            raise TypeError(f"{op}: {name} must be {allowed} on the {backend} backend, got {t.dtype}")
    if backend in ("triton", "cuda"):
        for name, t in (("h_in", h_in), ("h_out", h_out)):
            if t.dtype == torch.float64:
                raise TypeError(f"{op}: the {backend} backend does not take float64 {name}; use 'cpu' or 'torch'")
    if h_in.dim() != 2:
        raise ValueError(f"{op}: h_in must be 2-D (n, d_in), got shape {tuple(h_in.shape)}")
    if h_out.dim() != 2:
        raise ValueError(f"{op}: h_out must be 2-D (n, d_out), got shape {tuple(h_out.shape)}")
    if h_in.shape[0] != h_out.shape[0]:
        raise ValueError(
            f"{op}: h_in and h_out must have the same number of rows, got {h_in.shape[0]} and {h_out.shape[0]}"
        )
    if h_in.shape[1] < 1:
        raise ValueError(f"{op}: h_in must have at least one feature (d_in >= 1), got shape {tuple(h_in.shape)}")
    if h_out.shape[1] < 1:
        raise ValueError(f"{op}: h_out must have at least one feature (d_out >= 1), got shape {tuple(h_out.shape)}")
    blocks = -(-h_in.shape[0] // SHIFT_BLOCK_ROWS)
    for name, t, h, x in (("shift_in", shift_in, h_in, "h_in"), ("shift_out", shift_out, h_out, "h_out")):
        d = h.shape[1]
        if t.shape != (d,) and t.shape != (blocks, d):
            raise ValueError(
                f"{op}: {name} must have shape ({d},) or ({blocks}, {d}) (one row per block of "
                f"{SHIFT_BLOCK_ROWS} rows of {x}), got {tuple(t.shape)}"
            )
    dev = h_in.device
    for name, t in (("h_out", h_out), ("shift_in", shift_in), ("shift_out", shift_out)):
        if t.device != dev:
            raise ValueError(f"{op}: all tensors must be on one device: h_in is on {dev}, {name} on {t.device}")
