"""torch.library registration of the esta operators: fakes and autograd.

Two forward/backward operator pairs implement the fused stitched linear:
  esta::stitched_linear / esta::stitched_linear_backward
      schemas in esta_kernels/_ext.py; C++ kernels per dispatch key: CPU (the `cpu` backend, csrc/cpu/),
      CUDA (`cuda`, csrc/cuda/).
  esta::stitched_linear_triton / esta::stitched_linear_triton_backward
      Python custom ops that launch the Triton kernels (the `triton` backend). They are opaque custom ops
      rather than `triton_op`, so the very same op runs on CUDA and on CPU tensors under
      TRITON_INTERPRET=1, and passes opcheck and torch.compile in both places.
Both pairs share one fake and one autograd formula.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from esta_kernels import _ext  # noqa: F401  (defines the schemas and loads the kernels)



def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------- fakes
def _fake_forward(x, weight, bias, lora_a, lora_b, stitch_bias, stitch_ids, scale):
    M, N = x.shape[0], weight.shape[0]
    r = 0 if lora_a is None else lora_a.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, r), dtype=acc_dtype(x.dtype))


def _fake_backward(grad_y, x, weight, lora_a, lora_b, lora_xa, stitch_ids, num_stitches, scale, output_mask):
    acc = acc_dtype(x.dtype)
    N, K = weight.shape
    r = 0 if lora_a is None else lora_a.shape[0]
    dx = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    da = x.new_empty((r, K), dtype=acc) if output_mask[1] and r else x.new_empty((0,), dtype=acc)
    db = x.new_empty((N, r), dtype=acc) if output_mask[2] and r else x.new_empty((0,), dtype=acc)
    ds = x.new_empty((num_stitches, N), dtype=acc) if output_mask[3] else x.new_empty((0,), dtype=acc)
    return dx, da, db, ds


torch.library.register_fake("esta::stitched_linear")(_fake_forward)
torch.library.register_fake("esta::stitched_linear_backward")(_fake_backward)


# ------------------------------------------------------------------------------------ triton custom ops
@torch.library.custom_op("esta::stitched_linear_triton", mutates_args=())
def stitched_linear_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor],
    stitch_bias: Optional[Tensor], stitch_ids: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor]:
    from esta_kernels.triton.stitched_linear import triton_stitched_linear_forward

    return triton_stitched_linear_forward(x, weight, bias, lora_a, lora_b, stitch_bias, stitch_ids, scale)


@torch.library.custom_op("esta::stitched_linear_triton_backward", mutates_args=())
def stitched_linear_triton_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Optional[Tensor], lora_b: Optional[Tensor],
    lora_xa: Tensor, stitch_ids: Optional[Tensor], num_stitches: int, scale: float, output_mask: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from esta_kernels.triton.stitched_linear import triton_stitched_linear_backward

    return triton_stitched_linear_backward(
        grad_y, x, weight, lora_a, lora_b, lora_xa, stitch_ids, num_stitches, scale, output_mask
    )


stitched_linear_triton.register_fake(_fake_forward)
stitched_linear_triton_backward.register_fake(_fake_backward)


# ------------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, stitch_bias, stitch_ids, scale = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.scale = scale
    ctx.num_stitches = 0 if stitch_bias is None else stitch_bias.shape[0]
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (lora_a, lora_b, stitch_bias))
    ctx.has_bias = bias is not None
    # weight, lora_a and lora_b are parameters: saving them costs no memory. The activations saved are
    # x, the (M, r) float32 intermediate and the ids.
    ctx.save_for_backward(x, weight, lora_a, lora_b, xa, stitch_ids)


def _differentiable_backward(ctx, grad_y, x, weight, lora_a, lora_b, stitch_ids):
    """The backward formulas as differentiable torch ops, for double backward (create_graph=True): the
    fused backward kernels are not differentiable themselves. xa is recomputed so that d lora_b has a
    gradient with respect to lora_a and x."""
    need = ctx.needs_input_grad
    acc = acc_dtype(x.dtype)
    dy, xd = grad_y.to(acc), x.to(acc)
    grads = [None] * 8
    g = None
    if lora_a is not None:
        a, b = lora_a.to(acc), lora_b.to(acc)
        g = ctx.scale * (dy @ b)
    if need[0]:
        dx = dy @ weight.to(acc)
        grads[0] = (dx if g is None else dx + g @ a).to(x.dtype)
    if need[3] and g is not None:
        grads[3] = (g.t() @ xd).to(ctx.dtypes[0])
    if need[4] and g is not None:
        grads[4] = (ctx.scale * (dy.t() @ (xd @ a.t()))).to(ctx.dtypes[1])
    if need[5] and stitch_ids is None:  # a table without ids adds nothing
        grads[5] = dy.new_zeros(ctx.num_stitches, dy.shape[1]).to(ctx.dtypes[2])
    elif need[5]:
        S, M = ctx.num_stitches, dy.shape[0]
        ids = stitch_ids.expand(M)
        rows = torch.where((ids >= 0) & (ids < S), ids, S)  # invalid ids land in a dropped extra row
        grads[5] = dy.new_zeros(S + 1, dy.shape[1]).index_add(0, rows, dy)[:S].to(ctx.dtypes[2])
    if need[1]:
        grads[1] = grad_y.t().mm(x)
    if need[2]:
        grads[2] = grad_y.sum(0, dtype=acc).to(grad_y.dtype)
    return tuple(grads)


def _make_backward(backward_op):
    def backward(ctx, grad_y, grad_xa):
        x, weight, lora_a, lora_b, xa, stitch_ids = ctx.saved_tensors
        if torch.is_grad_enabled():  # backward(create_graph=True): double backward needs a graph
            return _differentiable_backward(ctx, grad_y, x, weight, lora_a, lora_b, stitch_ids)
        need = ctx.needs_input_grad
        mask = [need[0], need[3], need[4], need[5]]
        grad_y = grad_y.contiguous()
        grads = [None] * 8
        if any(mask):
            dx, da, db, ds = backward_op(
                grad_y, x, weight, lora_a, lora_b, xa, stitch_ids, ctx.num_stitches, ctx.scale, mask
            )
            da_dtype, db_dtype, ds_dtype = ctx.dtypes
            grads[0] = dx if need[0] else None
            grads[3] = da.to(da_dtype) if need[3] else None
            grads[4] = db.to(db_dtype) if need[4] else None
            grads[5] = ds.to(ds_dtype) if need[5] else None
        # A frozen weight is the fused path; a trainable one (full fine-tuning baseline) is unfused.
        if need[1]:
            grads[1] = grad_y.t().mm(x)
        if need[2]:
            grads[2] = grad_y.sum(0, dtype=acc_dtype(grad_y.dtype)).to(grad_y.dtype)
        return tuple(grads)

    return backward


torch.library.register_autograd(
    "esta::stitched_linear", _make_backward(torch.ops.esta.stitched_linear_backward), setup_context=_setup_context
)
torch.library.register_autograd(
    "esta::stitched_linear_triton", _make_backward(torch.ops.esta.stitched_linear_triton_backward),
    setup_context=_setup_context,
)

FORWARD_OPS = {
    "cpu": torch.ops.esta.stitched_linear,
    "cuda": torch.ops.esta.stitched_linear,
    "triton": torch.ops.esta.stitched_linear_triton,
}
BACKWARD_OPS = {
    "cpu": torch.ops.esta.stitched_linear_backward,
    "cuda": torch.ops.esta.stitched_linear_backward,
    "triton": torch.ops.esta.stitched_linear_triton_backward,
}
