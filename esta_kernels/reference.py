"""Pure-PyTorch reference of every esta op: readable, float64-capable, the oracle of the tests.

`torch_stitched_linear` follows the op contract literally (docs/architecture.md, "The op contracts") and is
differentiable through ordinary autograd. Benchmarks import their naive baseline from here too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from esta_kernels._validate import SHIFT_BLOCK_ROWS, as_int64_ids, check_ids_range


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def torch_stitched_linear(x, weight, bias=None, lora_a=None, lora_b=None, stitch_bias=None, stitch_ids=None,
                          *, scale: float = 1.0) -> torch.Tensor:
    """y = x @ W.T + b + scale * (x @ A.T) @ B.T + stitch_bias[ids], accumulated in float32 (float64 for float64)."""
    acc = _acc_dtype(x.dtype)
    y = F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    if lora_a is not None:
        xa = x.to(acc) @ lora_a.to(acc).t()
        y = y + scale * (xa @ lora_b.to(acc).t())
    if stitch_bias is not None and stitch_ids is not None:
        S, N = stitch_bias.shape
        ids = as_int64_ids(torch.as_tensor(stitch_ids, device=x.device))
        valid = (ids >= -1) & (ids < S)
        if torch.compiler.is_compiling():
            # no host read while tracing: a device-side assert (raised when the compiled code runs)
            torch._assert_async(valid.all(), "stitched_linear: a stitch id is outside [-1, S) (S = stitch-bias rows)")
        elif ids.numel():
            check_ids_range(ids, S)
        ids = ids.expand(x.shape[:-1])
        # -1 (and, past the assert, any invalid id) picks an appended row of zeros: never an out-of-bounds read
        table = torch.cat([stitch_bias.to(acc), stitch_bias.new_zeros(1, N, dtype=acc)], 0)
        y = y + table[torch.where(valid.expand(x.shape[:-1]) & (ids >= 0), ids, S)]
    return y.to(x.dtype)


def naive_stitched_linear(x, weight, bias=None, lora_a=None, lora_b=None, stitch_bias=None, stitch_ids=None,
                          *, scale: float = 1.0) -> torch.Tensor:
    """The unfused composition a user would write: F.linear, two matmuls and an indexed bias, in x's dtype."""
    y = F.linear(x, weight, bias)
    if lora_a is not None:
        y = y + scale * ((x @ lora_a.to(x.dtype).t()) @ lora_b.to(x.dtype).t())
    if stitch_bias is not None and stitch_ids is not None:
        if isinstance(stitch_ids, int):
            if stitch_ids >= 0:
                y = y + stitch_bias[stitch_ids].to(x.dtype)
        else:
            ids = stitch_ids
            sb = torch.cat([stitch_bias.to(x.dtype), stitch_bias.new_zeros(1, stitch_bias.shape[1], dtype=x.dtype)])
            y = y + sb[torch.where(ids < 0, stitch_bias.shape[0], ids)]
    return y


def torch_lstsq_accumulate(h_in, h_out, shift_in, shift_out):
    """One batch of the least-squares init, the literal contract in float64 (esta::lstsq_accumulate).

    u = h_in - shift_in[b], v = h_out - shift_out[b] for row m of block b = m // 1024 (2-D shifts, one row
    per block; a 1-D shift applies to every row), ua = [u, 1]; returns (ua.T @ ua, ua.T @ v) in float64.
    Makes float64 copies of the batch: it is the oracle, not a fast path.
    """
    def centred(h, shift):
        shift = shift.to(torch.float64)
        if shift.dim() == 2:
            shift = shift[torch.arange(h.shape[0], device=h.device) // SHIFT_BLOCK_ROWS]
        return h.to(torch.float64) - shift

    u, v = centred(h_in, shift_in), centred(h_out, shift_out)
    ua = torch.cat([u, u.new_ones(u.shape[0], 1)], 1)
    return ua.t() @ ua, ua.t() @ v


def pinv_lstsq(h_in, h_out):
    """SN-Net's least-squares init: pinv of [H_in, 1] over every token, then [W, b] = pinv @ H_out.

    Returns weight (d_out, d_in) and bias (d_out,) in h_in's dtype. The baseline of bench/test_bench_lstsq.py.
    """
    ones = h_in.new_ones(h_in.shape[0], 1)
    wb = torch.linalg.pinv(torch.cat([h_in, ones], 1)) @ h_out
    return wb[:-1].t().contiguous(), wb[-1].contiguous()


def gram_cholesky_lstsq(h_in, h_out):
    """A plain-torch normal-equations solve: the float64 Gram of [H_in, 1] and one Cholesky solve.

    Returns weight (d_out, d_in) and bias (d_out,) in float64. A benchmark baseline (no streaming, no
    centring, no fallback for singular Grams).
    """
    ha = torch.cat([h_in, h_in.new_ones(h_in.shape[0], 1)], 1).to(torch.float64)
    wb = torch.cholesky_solve(ha.t() @ h_out.to(torch.float64), torch.linalg.cholesky(ha.t() @ ha))
    return wb[:-1].t().contiguous(), wb[-1].contiguous()
