"""The fused stitched linear: functional API.

    y = x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T + stitch_bias[stitch_ids]
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from esta_kernels import _ops
from esta_kernels._validate import check_scale, check_stitched_linear_args, flat_ids, host_stitch_id
from esta_kernels.backends import resolve_backend
from esta_kernels.reference import torch_stitched_linear


def _apply_autocast(x, weight, bias, lora_a, lora_b, stitch_bias):
    """Under torch.autocast, run in the autocast dtype like F.linear; LoRA and stitch-bias parameters stay
    float32 (master weights) or are cast to the compute dtype."""
    dev = x.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return x, weight, bias, lora_a, lora_b, stitch_bias
    if x.dtype == torch.float64 or not x.is_floating_point():
        return x, weight, bias, lora_a, lora_b, stitch_bias
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        return None if t is None else t.to(dt)

    def cast_param(t):
        return t if t is None or t.dtype in (dt, torch.float32) else t.to(dt)

    return cast(x), cast(weight), cast(bias), cast_param(lora_a), cast_param(lora_b), cast_param(stitch_bias)


def stitched_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    lora_a: Optional[Tensor] = None,
    lora_b: Optional[Tensor] = None,
    stitch_bias: Optional[Tensor] = None,
    stitch_ids: Union[int, Tensor, None] = None,
    *,
    scale: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """Frozen linear + shared LoRA + per-row stitch bias, as one fused op.

    Args:
        x: (..., K) input; float32, float16, bfloat16 (float64 on the torch and cpu backends).
        weight: (N, K) frozen weight, x's dtype.
        bias: (N,) or None.
        lora_a, lora_b: (r, K) and (N, r), both or neither; x's dtype or float32.
        stitch_bias: (S, N) one bias row per stitch; x's dtype or float32.
        stitch_ids: an int for every row, or an integer tensor of x's leading shape; -1 adds no stitch
            bias; anything else outside [-1, S) raises IndexError.
        scale: multiplies the LoRA term (lora_alpha / r).
        backend: "auto", "torch", "cpu", "triton" or "cuda" (see esta_kernels.backends).

    Returns:
        y of shape (..., N) in x's dtype.
    """
    if all(t is None or isinstance(t, Tensor) for t in (weight, bias, lora_a, lora_b, stitch_bias)) \
            and isinstance(x, Tensor):
        # first, as F.linear does: under autocast x may arrive in the autocast dtype with a float32 weight
        x, weight, bias, lora_a, lora_b, stitch_bias = _apply_autocast(x, weight, bias, lora_a, lora_b, stitch_bias)
    check_stitched_linear_args(x, weight, bias, lora_a, lora_b, stitch_bias, stitch_ids)
    scale = check_scale(scale)
    if stitch_ids is not None and not isinstance(stitch_ids, Tensor):
        stitch_ids = host_stitch_id(stitch_ids)  # numpy integers included
    name = resolve_backend(backend, x.device)
    if name == "torch":
        return torch_stitched_linear(x, weight, bias, lora_a, lora_b, stitch_bias, stitch_ids, scale=scale)
    if name in ("cpu",) and x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"backend {name!r} does not support {x.dtype}")
    if name in ("triton", "cuda") and x.dtype == torch.float64:
        raise TypeError(f"backend {name!r} does not support float64; use backend='torch' or 'cpu'")

    lead = x.shape[:-1]
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(math.prod(lead), K)  # not (-1, K): K may be 0
    ids = None
    if stitch_bias is not None and stitch_ids is not None:
        if isinstance(stitch_ids, int):
            # checked on the host above; a fill, not a copy, so no host-to-device transfer either
            ids = torch.full((1,), stitch_ids, dtype=torch.int64, device=x.device)
        else:
            ids = flat_ids(stitch_ids)
    y, _ = _ops.FORWARD_OPS[name](x2, weight, bias, lora_a, lora_b, stitch_bias, ids, float(scale))
    return y.reshape(*lead, N)
