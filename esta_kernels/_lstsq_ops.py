"""torch.library registration of the least-squares accumulation op, and its argument checks.

    esta::lstsq_accumulate(h_in, h_out, shift_in, shift_out) -> (gram, cross)
        With b(m) = m // SHIFT_BLOCK_ROWS the block of row m, u[m] = h_in[m] - shift_in[b(m)],
        v[m] = h_out[m] - shift_out[b(m)] and ua = [u, 1]: gram = ua.T @ ua, cross = ua.T @ v in float64.
        The shifts are (blocks, d) with blocks = ceil(n / SHIFT_BLOCK_ROWS), one row per block, or (d,) for
        one shift for every row.
        Schema in esta_kernels/_ext.py; C++ kernels per dispatch key: CPU (the `cpu` backend, csrc/cpu/lstsq.cpp)
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


# Read once at import, like _ext.has_cpu_kernels(): an extension built before this op existed lacks it.
_HAS_CPU = _ext.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("esta::lstsq_accumulate", "CPU")
_HAS_CUDA = _ext.HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("esta::lstsq_accumulate", "CUDA")



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
