"""Random inputs for the stitched-linear tests, shared by the test files and the GPU tests."""
from __future__ import annotations

import torch

import esta_kernels


def make_inputs(M, K, N, r, S, *, dtype=torch.float32, device="cpu", lora=True, bias=True, ids="rows",
                param_dtype=None, lead=None, seed=None, requires_grad=False):
    """ids: "rows" (per-row ids mixing -1 and valid), "int" (one id), "none", or "tensor0d"."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    pdt = param_dtype or dtype

    def rnd(*shape, dt=dtype, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dt).to(device)

    shape = tuple(lead) + (K,) if lead is not None else (M, K)
    x = rnd(*shape)
    weight = rnd(N, K, s=max(K, 1) ** -0.5)
    b = rnd(N) if bias else None
    a_ = rnd(r, K, dt=pdt, s=max(K, 1) ** -0.5) if lora else None
    b_ = rnd(N, r, dt=pdt, s=r ** -0.5) if lora else None
    sb = rnd(S, N, dt=pdt) if S is not None else None
    lead_shape = shape[:-1]
    if ids == "rows":
        ids_t = torch.randint(-1, S, lead_shape, generator=g).to(device)
    elif ids == "int":
        ids_t = int(torch.randint(0, S, (), generator=g))
    elif ids == "tensor0d":
        ids_t = torch.randint(0, S, (), generator=g).to(device)
    else:
        ids_t = None
    if S is None:
        ids_t = None
    if requires_grad:
        for t in (x, a_, b_, sb):
            if t is not None:
                t.requires_grad_(True)
    return dict(x=x, weight=weight, bias=b, lora_a=a_, lora_b=b_, stitch_bias=sb, stitch_ids=ids_t)


def reference(inp, scale):
    """float64 reference output of the op contract."""
    d = {k: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    return esta_kernels.torch_stitched_linear(**d, scale=scale)


def grads_of(fn, inp, scale, grad_y, cast):
    """Gradients of x, lora_a, lora_b, stitch_bias through fn(**inputs, scale=scale), each floating input
    passed through `cast` first (a fresh leaf)."""
    d = {}
    for k, v in inp.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = cast(v.detach())
            if k in ("x", "lora_a", "lora_b", "stitch_bias"):
                v.requires_grad_(True)
        d[k] = v
    fn(**d, scale=scale).backward(grad_y.to(d["x"].dtype))
    return {k: d[k].grad for k in ("x", "lora_a", "lora_b", "stitch_bias") if d[k] is not None}


def reference_grads(inp, scale, grad_y):
    """float64 gradients of x, lora_a, lora_b, stitch_bias under the reference."""
    return grads_of(esta_kernels.torch_stitched_linear, inp, scale, grad_y, lambda t: t.double())


def triton_test_marks(kernel):
    """(interpreter marks, GPU marks) for tests of a Triton kernel: interpreter tests need TRITON_INTERPRET=1
    at import and triton >= 3.8 (3.6's interpreter hands numpy 2.4 1-element arrays where ints are due);
    GPU tests need CUDA and compiled kernels."""
    import pytest
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    interpreting = isinstance(kernel, InterpretedFunction)
    old = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8)
    interp = [pytest.mark.interpreter,
              pytest.mark.skipif(not interpreting, reason="triton was imported without TRITON_INTERPRET=1"),
              pytest.mark.skipif(interpreting and old, reason="Triton's interpreter needs triton >= 3.8")]
    gpu = [pytest.mark.gpu, pytest.mark.skipif(
        interpreting or not torch.cuda.is_available(),
        reason="needs a CUDA GPU and compiled (not interpreted) Triton kernels")]
    return interp, gpu


def lowp_error(inp, scale, ref):
    """The error PyTorch's own unfused composition makes in the input dtype: low-precision checks are
    relative to it."""
    d = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    naive = esta_kernels.naive_stitched_linear(**d, scale=scale)
    return (naive.double() - ref).abs().max().item()
