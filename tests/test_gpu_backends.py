"""The GPU backends, `cuda` (CUDA C++ kernels in csrc/cuda/) and `triton`, against the float64 torch reference.

GPU tests carry the `gpu` marker and skip without CUDA; the `cuda` cases also skip without the CUDA kernels
in esta_kernels._C, the `triton` cases without triton.
Low-precision results are judged against the error PyTorch's own unfused composition makes in that dtype.
"""
import os

import pytest
import torch

import esta_kernels
from esta_kernels import _ext, _ops
from esta_kernels.backends import triton_installed
from _inputs import grads_of, make_inputs, reference, reference_grads

OPS = ("esta::stitched_linear", "esta::stitched_linear_backward")
HAS_CUDA_KERNELS = _ext.has_cuda_kernels()

# every GPU test: selected by `pytest -m gpu`, skipped without a GPU or without the CUDA kernels
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BACKENDS = [
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not HAS_CUDA_KERNELS, reason="esta_kernels._C was built without its CUDA kernels (ESTA_BUILD_CUDA=1)")),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(not triton_installed(), reason="needs triton")),
]
with_backends = pytest.mark.parametrize("backend", BACKENDS)

DTYPES = [pytest.param(d, id=n) for d, n in ((torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16"))]
SHAPES = [(37, 45), (384, 1152)]
# the unit roundoff of each dtype: slack for a single rounding of the output
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _cuda_inputs(M, K, N, r, S, dtype, ids, **kw):
    return make_inputs(M, K, N, r, S, dtype=dtype, device="cuda", ids=ids, **kw)


def _naive(inp, scale):
    d = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    return esta_kernels.naive_stitched_linear(**d, scale=scale)


def _assert_close(out, ref, dtype, lowp_err=0.0, what="output"):
    """float32: 5e-5 absolute + relative. float16/bfloat16: 3x PyTorch's own low-precision error plus a few
    roundings of the largest value."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: unwritten or non-finite elements"
    err = (out.double() - ref).abs()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    if dtype == torch.float32:
        bound = 5e-5 + 5e-5 * ref.abs()
    else:
        bound = 3 * lowp_err + 4 * EPS[dtype] * (1 + scale)
    worst = (err - bound).max().item() if err.numel() else -1
    assert worst <= 0, f"{what}: max error {err.max().item():.3g}, torch's own {dtype} error {lowp_err:.3g}"


@gpu
@needs_cuda
@with_backends
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 130, 1000])
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("r", [1, 16])
@pytest.mark.parametrize("ids", ["rows", "int", "none"])
def test_forward(backend, dtype, M, K, N, r, ids, poison_empty):
    inp = _cuda_inputs(M, K, N, r, 5, dtype, ids)
    scale = 0.75
    ref = reference(inp, scale)
    out = esta_kernels.stitched_linear(**inp, scale=scale, backend=backend)
    assert out.dtype == dtype and out.device.type == "cuda"
    lowp = 0.0 if dtype == torch.float32 else (_naive(inp, scale).double() - ref).abs().max().item()
    _assert_close(out, ref, dtype, lowp)


@gpu
@needs_cuda
@with_backends
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora,bias,S", [(False, True, 5), (True, False, 5), (True, True, None), (False, False, None)])
@pytest.mark.parametrize("param_dtype", ["same", "f32"])
def test_forward_optional_parts(backend, dtype, lora, bias, S, param_dtype, poison_empty):
    pdt = torch.float32 if param_dtype == "f32" else dtype
    inp = _cuda_inputs(33, 40, 45, 4, S, dtype, "rows" if S else "none", lora=lora, bias=bias, param_dtype=pdt)
    ref = reference(inp, 2.0)
    out = esta_kernels.stitched_linear(**inp, scale=2.0, backend=backend)
    lowp = 0.0 if dtype == torch.float32 else (_naive(inp, 2.0).double() - ref).abs().max().item()
    _assert_close(out, ref, dtype, lowp)


def _naive_grads(inp, scale, grad_y):
    """Gradients of PyTorch's unfused composition in the input dtype (float32 masters stay float32)."""
    return grads_of(esta_kernels.naive_stitched_linear, inp, scale, grad_y, lambda t: t.clone())


@gpu
@needs_cuda
@with_backends
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [7, 130, 1000])
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("r", [1, 16])
@pytest.mark.parametrize("ids", ["rows", "int"])
def test_backward(backend, dtype, M, K, N, r, ids):
    inp = _cuda_inputs(M, K, N, r, 5, dtype, ids, param_dtype=torch.float32, requires_grad=True)
    scale = 0.5
    grad_y = torch.randn(M, N, dtype=torch.float64, device="cuda").to(dtype)
    y = esta_kernels.stitched_linear(**inp, scale=scale, backend=backend)
    y.backward(grad_y)
    ref = reference_grads(inp, scale, grad_y)
    naive = _naive_grads(inp, scale, grad_y) if dtype != torch.float32 else {}
    for name, g_ref in ref.items():
        g = inp[name].grad
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == inp[name].dtype and g.shape == inp[name].shape
        if dtype == torch.float32:
            # reductions over up to M = 1000 rows: scale the tolerance by the gradient's size
            mag = 1 + g_ref.abs().max().item()
            err = (g.double() - g_ref).abs().max().item()
            assert torch.isfinite(g).all() and err <= 5e-5 * mag, f"d {name}: max error {err:.3g}"
        else:
            lowp = (naive[name].double() - g_ref).abs().max().item()
            _assert_close(g, g_ref, dtype, lowp, what=f"d {name}")


@gpu
@needs_cuda
@with_backends
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_is_deterministic_and_sums_stitch_rows(backend, dtype):
    M, K, N, S = 1000, 64, 96, 4
    inp = _cuda_inputs(M, K, N, 8, S, dtype, "rows", param_dtype=torch.float32)
    # runs of one id, as batches of sequences produce, and single rows switching ids
    ids = torch.randint(-1, S, (M // 50,), device="cuda").repeat_interleave(50)
    ids[::7] = torch.randint(-1, S, ids[::7].shape, device="cuda")
    x, w, a, b, sb = (inp[k] for k in ("x", "weight", "lora_a", "lora_b", "stitch_bias"))
    _, xa = _ops.FORWARD_OPS[backend](x, w, None, a, b, sb, ids, 0.5)
    dy = torch.randn(M, N, device="cuda").to(dtype)
    outs = [_ops.BACKWARD_OPS[backend](dy, x, w, a, b, xa, ids, S, 0.5, [True] * 4) for _ in range(2)]
    for first, second in zip(*outs):
        assert torch.equal(first, second), "the backward is not bitwise reproducible"
    ds = outs[0][3]
    for s in range(S):
        expected = dy[ids == s].double().sum(0)
        torch.testing.assert_close(ds[s].double(), expected, atol=1e-3, rtol=1e-4)


@gpu
@needs_cuda
@with_backends
@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_and_misaligned_operands(backend, dtype):
    """Offset views (rows not 16-byte aligned) take the element-wise load path; strided views are copied."""
    K, N = 64, 40
    inp = _cuda_inputs(30, K, N, 8, 6, dtype, "rows")
    base = torch.randn(30, K + 1, device="cuda").to(dtype)
    inp["x"] = base[:, 1:]  # offset by one element: misaligned rows
    ref = reference(inp, 1.5)
    out = esta_kernels.stitched_linear(**inp, scale=1.5, backend=backend)
    lowp = 0.0 if dtype == torch.float32 else (_naive(inp, 1.5).double() - ref).abs().max().item()
    _assert_close(out, ref, dtype, lowp)
    inp["x"] = torch.randn(K, 30, device="cuda").to(dtype).t()  # column-major
    inp["weight"] = torch.randn(2 * N, K, device="cuda").to(dtype)[::2] / K**0.5
    ref = reference(inp, 1.5)
    out = esta_kernels.stitched_linear(**inp, scale=1.5, backend=backend)
    lowp = 0.0 if dtype == torch.float32 else (_naive(inp, 1.5).double() - ref).abs().max().item()
    _assert_close(out, ref, dtype, lowp)


@gpu
@needs_cuda
@with_backends
def test_zero_rows(backend):
    inp = _cuda_inputs(0, 16, 24, 4, 3, torch.bfloat16, "rows", requires_grad=True)
    y = esta_kernels.stitched_linear(**inp, backend=backend)
    assert y.shape == (0, 24)
    y.float().sum().backward()
    assert inp["x"].grad.shape == (0, 16)
    assert inp["lora_a"].grad.abs().sum() == 0 and inp["stitch_bias"].grad.abs().sum() == 0


@gpu
@needs_cuda
# The cuda backend checks device ids without a host sync: a bad one raises a device-side assertion, which
# ends the CUDA context (tests/test_cuda_backend.py checks it in a child process).
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "cuda"])
@pytest.mark.parametrize("bad", [5, -2, 2**40])
def test_bad_ids_raise_index_error(backend, bad):
    inp = _cuda_inputs(9, 12, 10, 3, 5, torch.float16, "rows")
    ids = inp["stitch_ids"].clone()
    ids[4] = bad
    with pytest.raises(IndexError, match=r"outside \[-1, 5\)"):
        esta_kernels.stitched_linear(**{**inp, "stitch_ids": ids}, backend=backend)
    x, w, a, b, sb = (inp[k] for k in ("x", "weight", "lora_a", "lora_b", "stitch_bias"))
    with pytest.raises(IndexError, match=r"outside \[-1, 5\)"):
        _ops.FORWARD_OPS[backend](x, w, None, a, b, sb, ids, 1.0)
    xa = torch.zeros(9, 3, device="cuda")
    with pytest.raises(IndexError, match=r"outside \[-1, 5\)"):
        _ops.BACKWARD_OPS[backend](torch.ones(9, 10, device="cuda").half(), x, w, a, b, xa, ids, 5, 1.0,
                                                [True] * 4)


@gpu
@needs_cuda
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="the CUDA C++ op's own checks")
def test_bad_arguments_raise_clear_errors():
    inp = _cuda_inputs(9, 12, 10, 3, 5, torch.float16, "rows")
    x, w, a, b, sb, ids = (inp[k] for k in ("x", "weight", "lora_a", "lora_b", "stitch_bias", "stitch_ids"))
    with pytest.raises(TypeError, match="float64"):
        torch.ops.esta.stitched_linear(x.double(), w.double(), None, None, None, None, None, 1.0)
    with pytest.raises(ValueError, match="one CUDA device|lora_b"):
        torch.ops.esta.stitched_linear(x, w, None, a, b.cpu(), sb, ids, 1.0)
    with pytest.raises(TypeError, match="int64"):
        torch.ops.esta.stitched_linear(x, w, None, a, b, sb, ids.int(), 1.0)


@gpu
@needs_cuda
@with_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("ids", ["rows", "int", "none"])
def test_opcheck(backend, dtype, ids):
    inp = _cuda_inputs(13, 19, 21, 3, 4, dtype, ids, requires_grad=True)
    x = inp["x"]
    sid = inp["stitch_ids"]
    if isinstance(sid, int):
        sid = torch.tensor([sid], device="cuda")
    args = (x, inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["stitch_bias"], sid, 0.5)
    torch.library.opcheck(_ops.FORWARD_OPS[backend], args)
    _, xa = _ops.FORWARD_OPS[backend](*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
    dy = torch.randn(13, 21, device="cuda").to(dtype)
    for mask in ([True] * 4, [False, True, False, True], [True, False, False, False]):
        bargs = (dy, x.detach(), inp["weight"], inp["lora_a"].detach(), inp["lora_b"].detach(), xa, sid, 4, 0.5, mask)
        torch.library.opcheck(_ops.BACKWARD_OPS[backend], bargs)


@gpu
@needs_cuda
@with_backends
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_graph_capture_matches_eager(backend, dtype):
    """No sync happens while capturing (GPU ids are never read by the host), so forward and backward capture
    and replay."""
    M, K, N, S = 130, 96, 80, 5
    inp = _cuda_inputs(M, K, N, 16, S, dtype, "rows", param_dtype=torch.float32)
    x, w, bias, a, b, sb, ids = (inp[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "stitch_bias",
                                                  "stitch_ids"))
    dy = torch.randn(M, N, device="cuda").to(dtype)

    def step():
        y, xa = _ops.FORWARD_OPS[backend](x, w, bias, a, b, sb, ids, 0.5)
        grads = _ops.BACKWARD_OPS[backend](dy, x, w, a, b, xa, ids, S, 0.5, [True] * 4)
        return (y, xa) + tuple(grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()  # warm-up outside capture, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    x.copy_(torch.randn_like(x.float()).to(dtype))
    ids.copy_(torch.randint(-1, S, ids.shape, device="cuda"))
    graph.replay()
    expect = step()
    torch.cuda.synchronize()
    for name, got, want in zip(("y", "xa", "dx", "da", "db", "ds"), static, expect):
        assert torch.equal(got, want), f"{name}: graph replay differs from eager"
    assert not torch.equal(static[0], eager[0])  # the replay saw the new inputs


@gpu
@needs_cuda
@with_backends
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    inp = _cuda_inputs(21, 24, 40, 4, 5, torch.bfloat16, "rows", param_dtype=torch.float32, requires_grad=True)

    def f(x, a, b, sb, ids):
        y = esta_kernels.stitched_linear(torch.relu(x), inp["weight"], inp["bias"], a, b, sb, ids, scale=0.5,
                                         backend=backend)
        return (y.float() ** 2).sum()

    args = [inp[k] for k in ("x", "lora_a", "lora_b", "stitch_bias", "stitch_ids")]
    eager = f(*args)
    eager_grads = torch.autograd.grad(eager, args[:4])
    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    out = compiled(*args)
    grads = torch.autograd.grad(out, args[:4])
    torch.testing.assert_close(out, eager, atol=1e-3, rtol=1e-3)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-3, rtol=1e-3)


@gpu
@needs_cuda
@with_backends
@pytest.mark.parametrize("ids", ["int", "rows"])
def test_training_step_without_host_sync(backend, ids):
    """A StitchedLinear training step (autocast forward, backward, AdamW) makes no device-to-host sync: GPU
    ids are range-checked by the kernels' flag and torch._assert_async, never read by the host."""
    from esta.nn import StitchedLinear

    torch.manual_seed(0)
    layer = StitchedLinear.from_linear(torch.nn.Linear(256, 384).cuda(), rank=16, num_stitches=5, backend=backend)
    with torch.no_grad():
        layer.lora_b.normal_()  # zeros at init: make the LoRA term real
    x = torch.randn(4, 33, 256, device="cuda")
    layer.stitch_ids = 3 if ids == "int" else torch.randint(-1, 5, (4, 33), device="cuda")
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-3)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = layer(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # compilation, autotuning and the optimizer's state: outside the checked steps
    torch.cuda.synchronize()
    before = layer.lora_a.detach().clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert not torch.equal(before, layer.lora_a.detach()), "the steps did not train"


# ------------------------------------------------------------------------------------ no GPU needed
def test_cuda_kernels_registered_when_built_with_cuda():
    """A build with CUDA registers the CUDA kernels of both ops (checked without a GPU)."""
    if not _ext.HAS_EXTENSION:
        pytest.skip(f"esta_kernels._C is not built: {_ext.EXTENSION_ERROR}")
    asked = os.environ.get("ESTA_BUILD_CUDA", "").lower() == "1"
    if not HAS_CUDA_KERNELS:
        if asked and torch.version.cuda is not None:
            pytest.fail("ESTA_BUILD_CUDA=1 but esta_kernels._C has no CUDA kernels: rebuild the extension")
        pytest.skip(
            "esta_kernels._C was built without CUDA kernels (ESTA_BUILD_CUDA=0, a CPU-only torch, or no nvcc); "
            "set ESTA_BUILD_CUDA=1 to build and check them"
        )
    assert torch.version.cuda is not None
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
