"""The benchmark inputs, shared by the CPU benchmark (pytest-benchmark) and the GPU script. The shapes
themselves live in the package (esta_kernels/shapes.py), the one source every benchmark and the static
kernel report read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from esta_kernels.shapes import CPU_SHAPES, GPU_SHAPES, QUICK_SHAPES, SCALE, Shape  # noqa: F401  (one source of shapes)


def cpu_shapes() -> tuple:
    """ESTA_BENCH_QUICK=1 swaps in the tiny shapes (a smoke run of the harness, not a measurement)."""
    return QUICK_SHAPES if os.environ.get("ESTA_BENCH_QUICK", "0") == "1" else CPU_SHAPES


@dataclass
class Inputs:
    """One set of tensors for one shape. `weight` and `bias` are frozen; `lora_a`, `lora_b`, `stitch_bias`
    are the trainable parameters; `grad_y` is the upstream gradient used by forward+backward."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    stitch_bias: torch.Tensor
    stitch_ids: torch.Tensor
    grad_y: torch.Tensor
    scale: float = SCALE

    def trainable(self) -> list:
        return [self.lora_a, self.lora_b, self.stitch_bias]

    def parameters(self) -> list:
        """Every module-owned leaf tensor (frozen or trainable): what `saved_bytes` does not count."""
        return [t for t in (self.weight, self.bias, self.lora_a, self.lora_b, self.stitch_bias) if t is not None]

    def set_requires_grad(self, on: bool) -> None:
        """x and the trainable parameters; the frozen weight and bias never require grad."""
        self.x.requires_grad_(on)
        for t in self.trainable():
            t.requires_grad_(on)

    def zero_grad(self) -> None:
        for t in [self.x] + self.trainable():
            t.grad = None

    def nbytes(self) -> int:
        ts = [self.x, self.weight, self.bias, self.lora_a, self.lora_b, self.stitch_bias, self.stitch_ids, self.grad_y]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def make_inputs(shape: Shape, *, dtype=torch.float32, device="cpu", seed: int = 0) -> Inputs:
    """Random inputs at the scale of a trained layer (unit-variance activations, 1/sqrt(fan-in) weights);
    lora_b is random rather than LoRA's zero init, so the LoRA term is really computed and checked."""
    g = torch.Generator().manual_seed(seed)
    M, K, N, r, S = shape.M, shape.K, shape.N, shape.r, shape.S

    def rnd(*size, s=1.0):
        return (torch.randn(*size, generator=g) * s).to(device=device, dtype=dtype)

    return Inputs(
        x=rnd(M, K),
        weight=rnd(N, K, s=K ** -0.5),
        bias=rnd(N, s=0.1) if shape.bias else None,
        lora_a=rnd(r, K, s=K ** -0.5),
        lora_b=rnd(N, r, s=r ** -0.5),
        stitch_bias=rnd(S, N, s=0.1),
        stitch_ids=torch.randint(-1, S, (M,), generator=g).to(device),
        grad_y=rnd(M, N),
    )
