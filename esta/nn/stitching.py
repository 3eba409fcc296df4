"""`StitchingLayer`: the linear map between two anchors, initialized by least squares.

A stitch runs the front anchor's first blocks, a stitching layer, then the end anchor's last blocks. The
stitching layer is a `StitchedLinear` from the front width to the end width whose frozen weight and bias
solve min ||[H_in, 1][W, b]^T - H_out||^2 over activations of both anchors
(`esta_kernels.StreamingLstsq`), with ESTA's trainable parts on top: a LoRA of rank in_features // 4 (the
paper's choice) and one bias row per stitch that goes through this layer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from esta.nn.stitched_linear import StitchedLinear
from esta_kernels.lstsq import MultiTargetLstsq, StreamingLstsq


def default_rank(in_features: int) -> int:
    """ESTA's LoRA rank for stitching layers: in_features // 4, at least 1."""
    return max(1, in_features // 4)


class StitchingLayer(StitchedLinear):
    """A `StitchedLinear` from the front anchor's width to the end anchor's width.

    Build it from data with `StitchingLayer.from_lstsq(solver, num_stitches=S)`, or without data with
    `StitchingLayer.identity(in, out, num_stitches=S)` (the identity on the shared leading features). The
    constructor itself initializes weight and bias as `nn.Linear` does. Freshly built, lora_b and
    stitch_bias are zero, so the layer computes exactly x @ weight.T + bias.

    Args: as `StitchedLinear`, except that `rank` defaults to in_features // 4 (at least 1).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, num_stitches: int,
                 rank: Optional[int] = None, lora_alpha: Optional[float] = None, backend: str = "auto",
                 device=None, dtype=None) -> None:
        if rank is None:
            if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
                raise ValueError(f"StitchingLayer: in_features must be a positive int, got {in_features!r}")
            rank = default_rank(in_features)
        super().__init__(in_features, out_features, bias, rank=rank, num_stitches=num_stitches,
                         lora_alpha=lora_alpha, backend=backend, device=device, dtype=dtype)

    @classmethod
    @torch.no_grad()
    def from_lstsq(cls, solver, *, num_stitches: int, rank: Optional[int] = None,
                   lora_alpha: Optional[float] = None, ridge: Optional[float] = None, dtype=None,
                   target: Optional[int] = None, backend: str = "auto") -> "StitchingLayer":
        """A layer whose frozen weight and bias are `solver.solve(ridge)`.

        solver: a StreamingLstsq with data, or a MultiTargetLstsq together with `target` (the index of the
            end position this layer feeds). The layer has a bias iff the solver solved for one.
        dtype: of the frozen weight and bias (default float32; the solve itself is float64, rounded once).
        The layer lives on the solver's device.
        """
        if isinstance(solver, MultiTargetLstsq):
            if target is None:
                raise ValueError("StitchingLayer.from_lstsq: a MultiTargetLstsq needs target=<index of the target>")
            weight, bias = solver.solve(target, ridge)
            in_features, out_features = solver.in_features, solver.out_features_list[target]
        elif isinstance(solver, StreamingLstsq):
            if target is not None:
                raise ValueError("StitchingLayer.from_lstsq: target= applies to a MultiTargetLstsq only")
            weight, bias = solver.solve(ridge)
            in_features, out_features = solver.in_features, solver.out_features
        else:
            raise TypeError(
                f"StitchingLayer.from_lstsq expects a StreamingLstsq or MultiTargetLstsq, got {type(solver).__name__}"
            )
        dtype = torch.float32 if dtype is None else dtype
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"StitchingLayer.from_lstsq: dtype must be a floating torch.dtype, got {dtype!r}")
        return cls.from_frozen(weight.to(dtype), None if bias is None else bias.to(dtype), num_stitches=num_stitches,
                               rank=rank, lora_alpha=lora_alpha, backend=backend)

    @classmethod
    @torch.no_grad()
    def from_frozen(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], *, num_stitches: int,
                    rank: Optional[int] = None, lora_alpha: Optional[float] = None,
                    backend: str = "auto") -> "StitchingLayer":
        """A layer adopting `weight` (out, in) and `bias` (out,) or None as its frozen parameters (the same
        storage, frozen), with fresh adapters on the weight's device."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("StitchingLayer.from_frozen: weight must be a 2-D tensor (out_features, in_features)")
        out_features, in_features = weight.shape
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (out_features,)):
            raise ValueError(f"StitchingLayer.from_frozen: bias must be None or a tensor of shape ({out_features},)")
        # Built on the meta device: no throwaway nn.Linear init, then the given tensors are adopted.
        layer = cls(in_features, out_features, bias is not None, num_stitches=num_stitches, rank=rank,
                    lora_alpha=lora_alpha, backend=backend, device="meta", dtype=weight.dtype)
        layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        layer.weight.requires_grad_(False)
        if bias is not None:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
            layer.bias.requires_grad_(False)
        layer._create_adapters(weight.device)
        return layer

    @classmethod
    @torch.no_grad()
    def identity(cls, in_features: int, out_features: int, bias: bool = True, *, num_stitches: int,
                 rank: Optional[int] = None, lora_alpha: Optional[float] = None, backend: str = "auto",
                 device=None, dtype=None) -> "StitchingLayer":
        """The init without data: weight = the (out, in) identity (feature i maps to feature i for
        i < min(in, out), the rest zero), bias zero."""
        layer = cls(in_features, out_features, bias, num_stitches=num_stitches, rank=rank, lora_alpha=lora_alpha,
                    backend=backend, device=device, dtype=dtype)
        layer.weight.copy_(torch.eye(out_features, in_features, dtype=layer.weight.dtype, device=layer.weight.device))
        if layer.bias is not None:
            layer.bias.zero_()
        return layer
