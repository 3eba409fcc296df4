"""`esta bench`: the fused stitched-linear op against F.linear alone and the naive composition, here.

Forward and forward+backward medians over `repeats` runs after warm-up, float32 on the CPU (the device's
default dtype elsewhere: bfloat16 on CUDA). The repository's `bench/` holds the full pytest-benchmark suite
and the GPU check; this is the quick look that ships with the package.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import esta_kernels
from esta_kernels.reference import naive_stitched_linear
from esta_kernels.shapes import SCALE, shape_by_name

__all__ = ["SHAPES", "run_bench"]

# `esta bench --shape` names -> the CPU benchmark's shapes (esta_kernels/shapes.py, the one source of shapes)
SHAPES = {"vit-s": "vit_s_qkv_b64", "vit-b": "vit_b_qkv_b16", "llama": "llama7b_q_proj_m512"}


def _time(fn, repeats: int, sync) -> float:
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_bench(shape: str = "vit-s", *, backend: str = "auto", repeats: int = 20, device=None) -> str:
    if shape not in SHAPES:
        raise ValueError(f"esta bench: unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if repeats < 1:
        raise ValueError("esta bench: repeats must be at least 1")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spec = shape_by_name(SHAPES[shape])
    M, K, N, r, S = spec.M, spec.K, spec.N, spec.r, spec.S
    g = torch.Generator(device="cpu").manual_seed(0)

    def make(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device, dtype)

    x = make(M, K).requires_grad_()
    w, b = make(N, K, scale=K ** -0.5), (make(N) if spec.bias else None)
    la = make(r, K, scale=K ** -0.5).float().requires_grad_()
    lb = make(N, r, scale=0.1).float().requires_grad_()
    sb = make(S, N, scale=0.1).float().requires_grad_()
    ids = torch.randint(-1, S, (M,), generator=g).to(device)
    dy = make(M, N)
    providers = {
        "F.linear": lambda: F.linear(x, w, b),
        "naive composition": lambda: naive_stitched_linear(x, w, b, la, lb, sb, ids, scale=SCALE),
        f"esta ({esta_kernels.resolve_backend(backend, device)})": lambda: esta_kernels.stitched_linear(
            x, w, b, la, lb, sb, ids, scale=SCALE, backend=backend),
    }
    lines = [f"stitched linear, {shape}: M={M} K={K} N={N} r={r} S={S}, {dtype}, {device}, median of {repeats}",
             f"{'provider':<24} {'forward ms':>11} {'ratio':>6} {'fwd+bwd ms':>11} {'ratio':>6}"]
    base = None
    for name, fn in providers.items():
        with torch.no_grad():
            fwd = _time(fn, repeats, sync)

        def fwd_bwd():
            fn().backward(dy)

        both = _time(fwd_bwd, repeats, sync)
        x.grad = la.grad = lb.grad = sb.grad = None
        if base is None:
            base = (fwd, both)
        lines.append(f"{name:<24} {fwd * 1e3:>11.2f} {fwd / base[0]:>5.2f}x {both * 1e3:>11.2f} {both / base[1]:>5.2f}x")
    return "\n".join(lines)
