"""The benchmark shapes and their inputs, shared by the CPU benchmark (pytest-benchmark) and the GPU script.

A shape is one stitched linear layer as the ESTA settings use it: M rows (tokens), K inputs, N outputs,
LoRA rank r, S stitch-bias rows, per-row stitch ids drawn uniformly from [-1, S) (so about 1/(S+1) of the
rows add no stitch bias).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# lora_alpha / r: the LoRA scale every provider uses (PEFT's `scaling`)
SCALE = 2.0


@dataclass(frozen=True)
class Shape:
    name: str
    M: int
    K: int
    N: int
    r: int
    S: int
    bias: bool
    note: str = ""

    def forward_flops(self, lora: bool = True) -> int:
        """Multiply-adds x2 of y = x W^T + (x A^T) B^T; F.linear alone counts only the first term."""
        M, K, N, r = self.M, self.K, self.N, self.r
        return 2 * M * K * N + (2 * M * K * r + 2 * M * r * N if lora else 0)

    def backward_flops(self, lora: bool = True) -> int:
        """dx = dy W (+ g A) with g = dy B, and the LoRA grads dA = g^T x, dB = dy^T (x A^T)."""
        M, K, N, r = self.M, self.K, self.N, self.r
        dx = 2 * M * N * K
        if not lora:
            return dx
        return dx + 2 * M * N * r + 2 * M * r * K + 2 * M * r * K + 2 * M * N * r

    def as_dict(self) -> dict:
        return dict(name=self.name, M=self.M, K=self.K, N=self.N, r=self.r, S=self.S, bias=self.bias, note=self.note)


# ViT token counts: 197 tokens per 224x224 image with 16x16 patches (+ class token)
CPU_SHAPES = (
    Shape("vit_s_qkv_b64", M=64 * 197, K=384, N=1152, r=16, S=35, bias=True, note="ViT-S qkv, batch 64"),
    Shape("vit_b_qkv_b16", M=16 * 197, K=768, N=2304, r=8, S=35, bias=True, note="ViT-B qkv, batch 16"),
    Shape("llama7b_q_proj_m512", M=512, K=4096, N=4096, r=16, S=6, bias=False, note="LLaMA-7B q_proj, 512 tokens"),
)

# The GPU benchmark's shapes (issue 13): LLaMA-7B's attention projection and MLP (8192 tokens, 40 stitches,
# rank 16) and the ViT qkv layers of the vision setting.
GPU_SHAPES = (
    Shape("llama7b_q_proj", M=8192, K=4096, N=4096, r=16, S=40, bias=False, note="LLaMA-7B q_proj, 8192 tokens"),
    Shape("llama7b_mlp_up", M=8192, K=4096, N=11008, r=16, S=40, bias=False, note="LLaMA-7B MLP up, 8192 tokens"),
    Shape("llama7b_mlp_down", M=8192, K=11008, N=4096, r=16, S=40, bias=False,
          note="LLaMA-7B MLP down, 8192 tokens"),
    Shape("vit_b_qkv", M=16 * 197, K=768, N=2304, r=8, S=35, bias=True, note="ViT-B qkv, batch 16"),
    Shape("vit_s_qkv", M=64 * 197, K=384, N=1152, r=16, S=35, bias=True, note="ViT-S qkv, batch 64"),
)

# Tiny shapes for smoke runs (`--quick`, `--cpu-dry-run`): odd sizes, so they also catch padding bugs.
QUICK_SHAPES = (
    Shape("tiny_vit", M=197, K=96, N=288, r=4, S=5, bias=True, note="smoke"),
    Shape("tiny_llama", M=64, K=136, N=120, r=16, S=3, bias=False, note="smoke"),
)


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
