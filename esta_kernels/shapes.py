"""The benchmark shapes: one stitched linear layer as the ESTA settings use it (M rows (tokens), K inputs,
N outputs, LoRA rank r, S stitch-bias rows, per-row stitch ids drawn uniformly from [-1, S), so about
1/(S+1) of the rows add no stitch bias). The one source of shapes for `esta bench`, the repository's
bench/ suite, the GPU benchmark and the static kernel report (`python -m esta_kernels.inspect`).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SCALE", "Shape", "CPU_SHAPES", "GPU_SHAPES", "QUICK_SHAPES", "shape_by_name"]

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


def shape_by_name(name: str) -> Shape:
    """The shape called `name` among CPU_SHAPES, GPU_SHAPES and QUICK_SHAPES."""
    for shape in CPU_SHAPES + GPU_SHAPES + QUICK_SHAPES:
        if shape.name == name:
            return shape
    known = ", ".join(s.name for s in CPU_SHAPES + GPU_SHAPES + QUICK_SHAPES)
    raise ValueError(f"unknown shape {name!r}; known: {known}")
