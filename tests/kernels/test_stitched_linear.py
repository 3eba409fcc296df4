"""The fused stitched linear (esta_kernels.stitched_linear) on every backend, against the float64 torch reference.

One test body serves every device: the `device` axis holds the CPU cases (backends `torch`, `cpu` (C++ kernels
in csrc/cpu/) and `triton` under Triton's interpreter, marker `interpreter`) and the GPU cases (backends `cuda`
(CUTLASS kernels in csrc/cuda/) and `triton`, compiled), which carry the `gpu` marker and skip without a CUDA
GPU (the `cuda` ones also without the CUDA kernels in esta_kernels._C, the `triton` ones without triton).
bench/gpu_check.sh runs the gpu cases with `pytest -m gpu`. The GPU cases run more dtypes (bfloat16), larger
shapes and mixed parameter dtypes; each case carries its own shape list.

Tolerances: float32 against float64 is tight; float16 and bfloat16 are judged against the error PyTorch's own
unfused composition makes in that dtype (esta_kernels.naive_stitched_linear).
The tests at the end run on a GPU only (CUDA graphs, determinism of the GPU reductions, no host sync, ...).
"""

import pytest
import torch

import esta_kernels
from esta_kernels import _ext, _ops
from esta_kernels.backends import triton_installed
from tests.helpers.inputs import grads_of, lowp_error, make_inputs, reference, reference_grads

HAS_CUDA_KERNELS = _ext.has_cuda_kernels()
CPU_BACKENDS = [b for b in ("torch", "cpu", "triton") if b in esta_kernels.available_backends()]

# ------------------------------------------------------------------------------------ the device axis
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
gpu = pytest.mark.gpu
_GPU_BACKEND_MARKS = {
    "cuda": pytest.mark.skipif(not HAS_CUDA_KERNELS,
                               reason="esta_kernels._C was built without its CUDA kernels (ESTA_BUILD_CUDA=1)"),
    "triton": pytest.mark.skipif(not triton_installed(), reason="needs triton"),
}


def _marks(device, backend):
    """CPU: the Triton backend runs in the interpreter. CUDA: the `gpu` marker, skipped without a GPU, and the
    backend's own condition."""
    if device == "cpu":
        return [pytest.mark.interpreter] if backend == "triton" else []
    return [gpu, needs_cuda, _GPU_BACKEND_MARKS[backend]]


def _cases(names, rows):
    """pytest params of (device, backend, *rest) rows, marked for their device and backend."""
    out = []
    for device, backend, *rest in rows:
        tag = "-".join(_name(v) for v in (backend, *rest))
        out.append(pytest.param(device, backend, *rest, marks=_marks(device, backend), id=f"{device}-{tag}"))
    return pytest.mark.parametrize(",".join(names), out)


_DT_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _name(v):
    if isinstance(v, torch.dtype):
        return _DT_NAMES[v]
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


GPU_BACKENDS = [pytest.param(b, id=b, marks=_GPU_BACKEND_MARKS[b]) for b in ("cuda", "triton")]
with_backends = pytest.mark.parametrize("backend", GPU_BACKENDS)
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter has no bfloat16
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPES = [pytest.param(d, id=_DT_NAMES[d]) for d in GPU_DTYPES]
# the torch reference computes in float32 whatever the input dtype, so float16 adds nothing for it
CPU_BACKEND_DTYPES = [(b, dt) for b in CPU_BACKENDS for dt in CPU_DTYPES if not (b == "torch" and dt != torch.float32)]
GPU_BACKEND_DTYPES = [(b, dt) for b in ("cuda", "triton") for dt in GPU_DTYPES]
CPU_SHAPES = [(1, 37, 45), (7, 16, 33), (130, 37, 45), (66, 129, 70)]
GPU_SHAPES = [(M, K, N) for M in (1, 7, 130, 1000) for K, N in ((37, 45), (384, 1152))]

# ------------------------------------------------------------------------------------ tolerances
# CPU: atol = rtol per dtype (+ 2x torch's own low-precision error). GPU: float32 5e-5 absolute + relative;
# float16/bfloat16 3x torch's own error plus a few roundings (unit roundoff EPS) of the largest value.
CPU_TOL = {torch.float32: 2e-5, torch.float16: 1e-2}
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _assert_close(out, ref, device, dtype, lowp_err=0.0, what="output"):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: unwritten or non-finite elements"
    err = (out.double() - ref).abs()
    if device == "cpu":
        tol = CPU_TOL[dtype]
        bound = tol + tol * ref.abs() + 2 * lowp_err
    elif dtype == torch.float32:
        bound = 5e-5 + 5e-5 * ref.abs()
    else:
        bound = 3 * lowp_err + 4 * EPS[dtype] * (1 + (ref.abs().max().item() if ref.numel() else 0.0))
    worst = (err - bound).max().item() if err.numel() else -1
    assert worst <= 0, f"{what}: max error {err.max().item():.3g}, torch's own {dtype} error {lowp_err:.3g}"


def _assert_grad_close(g, g_ref, device, dtype, naive_g, what):
    """CPU: atol scaled by the gradient's size (x4 for float16) + rtol. GPU float32: 5e-5 of the gradient's
    size (reductions over up to 1000 rows); GPU float16/bfloat16: as outputs, against torch's own error."""
    if device == "cpu":
        tol = CPU_TOL[dtype]
        scaled = tol * (1 + g_ref.abs().max().item()) * (4 if dtype == torch.float16 else 1)
        assert torch.isfinite(g).all(), f"{what}: non-finite elements"
        err = (g.double() - g_ref).abs()
        assert (err <= scaled + tol * g_ref.abs()).all(), f"{what}: max error {err.max().item():.3g}"
    elif dtype == torch.float32:
        err = (g.double() - g_ref).abs().max().item()
        assert torch.isfinite(g).all() and err <= 5e-5 * (1 + g_ref.abs().max().item()), f"{what}: max error {err:.3g}"
    else:
        _assert_close(g, g_ref, device, dtype, (naive_g.double() - g_ref).abs().max().item(), what)


def _naive_grads(inp, scale, grad_y):
    """Gradients of PyTorch's unfused composition in the input dtype (float32 masters stay float32)."""
    return grads_of(esta_kernels.naive_stitched_linear, inp, scale, grad_y, lambda t: t.clone())


# ------------------------------------------------------------------------------------ every device
@_cases(("device", "backend", "dtype", "shape"),
        [("cpu", b, dt, s) for b, dt in CPU_BACKEND_DTYPES for s in CPU_SHAPES]
        + [("cuda", b, dt, s) for b, dt in GPU_BACKEND_DTYPES for s in GPU_SHAPES])
@pytest.mark.parametrize("r", [1, 16])
@pytest.mark.parametrize("ids", ["rows", "int", "none"])
def test_forward(device, backend, dtype, shape, r, ids, poison_empty):
    M, K, N = shape
    inp = make_inputs(M, K, N, r, 5, dtype=dtype, device=device, ids=ids)
    scale = 0.75
    ref = reference(inp, scale)
    out = esta_kernels.stitched_linear(**inp, scale=scale, backend=backend)
    assert out.dtype == dtype and out.device.type == device
    _assert_close(out, ref, device, dtype, lowp_error(inp, scale, ref) if dtype != torch.float32 else 0.0)


@_cases(("device", "backend", "dtype", "param_dtype", "K"),
        [("cpu", b, torch.float32, "same", 37) for b in CPU_BACKENDS]
        + [("cuda", b, dt, pdt, 40) for b, dt in GPU_BACKEND_DTYPES for pdt in ("same", "f32")])
@pytest.mark.parametrize("lora,bias,S", [(False, True, 5), (True, False, 5), (True, True, None), (False, False, None)])
def test_forward_optional_parts(device, backend, dtype, param_dtype, K, lora, bias, S, poison_empty):
    pdt = torch.float32 if param_dtype == "f32" else dtype
    inp = make_inputs(33, K, 45, 4, S, dtype=dtype, device=device, lora=lora, bias=bias,
                      ids="rows" if S else "none", param_dtype=pdt)
    ref = reference(inp, 2.0)
    out = esta_kernels.stitched_linear(**inp, scale=2.0, backend=backend)
    _assert_close(out, ref, device, dtype, lowp_error(inp, 2.0, ref) if dtype != torch.float32 else 0.0)


@_cases(("device", "backend", "dtype", "shape"),
        [("cpu", b, dt, s) for b, dt in CPU_BACKEND_DTYPES for s in [(1, 37, 45), (130, 37, 45)]]
        + [("cuda", b, dt, s) for b, dt in GPU_BACKEND_DTYPES for s in GPU_SHAPES if s[0] != 1])
@pytest.mark.parametrize("r", [1, 16])
@pytest.mark.parametrize("ids", ["rows", "int"])
def test_backward(device, backend, dtype, shape, r, ids):
    M, K, N = shape
    inp = make_inputs(M, K, N, r, 5, dtype=dtype, device=device, ids=ids, param_dtype=torch.float32,
                      requires_grad=True)
    scale = 0.5
    grad_y = torch.randn(M, N, dtype=torch.float64, device=device).to(dtype)
    y = esta_kernels.stitched_linear(**inp, scale=scale, backend=backend)
    y.backward(grad_y)
    ref = reference_grads(inp, scale, grad_y)
    naive = _naive_grads(inp, scale, grad_y) if device == "cuda" and dtype != torch.float32 else {}
    for name, g_ref in ref.items():
        g = inp[name].grad
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == inp[name].dtype and g.shape == inp[name].shape
        _assert_grad_close(g, g_ref, device, dtype, naive.get(name), f"d {name}")


@_cases(("device", "backend", "dtype"),
        [("cpu", b, torch.float32) for b in CPU_BACKENDS] + [("cuda", b, torch.bfloat16) for b in ("cuda", "triton")])
def test_zero_rows(device, backend, dtype):
    inp = make_inputs(0, 16, 24, 4, 3, dtype=dtype, device=device, ids="rows", requires_grad=True)
    y = esta_kernels.stitched_linear(**inp, backend=backend)
    assert y.shape == (0, 24)
    y.float().sum().backward()
    assert inp["x"].grad.shape == (0, 16)
    assert inp["lora_a"].grad.abs().sum() == 0
    assert inp["stitch_bias"].grad.abs().sum() == 0


# ------------------------------------------------------------------------------------ CPU backends
BACKENDS = [pytest.param(b, marks=_marks("cpu", b), id=b) for b in CPU_BACKENDS]


def _check_close(out, ref, atol, rtol):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "unwritten or non-finite output elements"
    err = (out.double() - ref).abs()
    assert (err <= atol + rtol * ref.abs()).all(), f"max err {err.max().item():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stitch_bias_grad_is_per_stitch_row_sum(backend):
    M, K, N, S = 50, 20, 24, 4
    inp = make_inputs(M, K, N, 3, S, ids="rows", requires_grad=True)
    ids = inp["stitch_ids"]
    grad_y = torch.randn(M, N)
    esta_kernels.stitched_linear(**inp, backend=backend).backward(grad_y)
    for s in range(S):
        expected = grad_y[ids == s].double().sum(0)
        torch.testing.assert_close(inp["stitch_bias"].grad[s].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_noncontiguous(backend):
    K, N = 24, 40
    base = torch.randn(3, 2 * K, 5)
    x = base.transpose(1, 2)[..., ::2]  # (3, 5, K), non-contiguous
    assert not x.is_contiguous()
    inp = make_inputs(15, K, N, 4, 6, ids="none")
    inp["x"] = x
    inp["stitch_ids"] = torch.randint(-1, 6, (3, 5))
    inp["weight"] = torch.randn(2 * N, K)[::2]  # non-contiguous weight
    ref = reference(inp, 1.5)
    out = esta_kernels.stitched_linear(**inp, scale=1.5, backend=backend)
    assert out.shape == (3, 5, N)
    _check_close(out, ref, 2e-5, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_d_tensor_id_equals_int_id(backend):
    inp = make_inputs(9, 16, 24, 4, 3, ids="none")
    a = esta_kernels.stitched_linear(**{**inp, "stitch_ids": 2}, backend=backend)
    b = esta_kernels.stitched_linear(**{**inp, "stitch_ids": torch.tensor(2)}, backend=backend)
    c = esta_kernels.stitched_linear(**{**inp, "stitch_ids": torch.full((9,), 2)}, backend=backend)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    none = esta_kernels.stitched_linear(**{**inp, "stitch_ids": -1}, backend=backend)
    torch.testing.assert_close(a - none, inp["stitch_bias"][2].expand(9, 24), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in CPU_BACKENDS])
def test_gradcheck_float64(backend):
    inp = make_inputs(6, 7, 5, 2, 3, dtype=torch.float64, ids="rows", requires_grad=True)
    names = ["x", "lora_a", "lora_b", "stitch_bias"]

    def f(x, a, b, sb):
        return esta_kernels.stitched_linear(x, inp["weight"], inp["bias"], a, b, sb, inp["stitch_ids"], scale=0.7,
                                            backend=backend)

    assert torch.autograd.gradcheck(f, tuple(inp[n] for n in names))


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in CPU_BACKENDS])
def test_gradcheck_trainable_weight_and_bias(backend):
    """Full fine-tuning: a weight and bias that require grad get correct (unfused) gradients."""
    inp = make_inputs(5, 4, 3, 2, 2, dtype=torch.float64, ids="int", requires_grad=True)
    inp["weight"].requires_grad_(True)
    inp["bias"].requires_grad_(True)

    def f(x, w, bias):
        return esta_kernels.stitched_linear(x, w, bias, inp["lora_a"], inp["lora_b"], inp["stitch_bias"],
                                            inp["stitch_ids"], backend=backend)

    assert torch.autograd.gradcheck(f, (inp["x"], inp["weight"], inp["bias"]))


def test_available_backends():
    b = esta_kernels.available_backends()
    assert b[0] == "torch"
    assert set(b) <= {"torch", "cpu", "triton", "cuda"}
    if not torch.cuda.is_available():
        assert "cuda" not in b


def test_extension_is_built_where_required():
    """CI (and anyone setting ESTA_REQUIRE_EXTENSION=1) must test the C++ kernels, not skip them quietly."""
    import os

    from esta_kernels import _ext

    if not (os.environ.get("CI") or os.environ.get("ESTA_REQUIRE_EXTENSION") == "1"):
        pytest.skip("neither CI nor ESTA_REQUIRE_EXTENSION=1 is set: running without the extension is allowed")
    assert _ext.HAS_EXTENSION, f"esta_kernels._C did not import: {_ext.EXTENSION_ERROR}"
    assert "cpu" in esta_kernels.available_backends()


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in CPU_BACKENDS])
@pytest.mark.parametrize("ids", ["rows", "int", "none"])
def test_gradgradcheck_float64(backend, ids):
    """Double backward (backward with create_graph=True) is supported on every backend: the backward runs
    as differentiable torch ops then (the cpu backend's fused backward once failed there)."""
    inp = make_inputs(5, 6, 4, 2, 3, dtype=torch.float64, ids=ids, requires_grad=True)
    names = ["x", "lora_a", "lora_b", "stitch_bias"]

    def f(x, a, b, sb):
        return esta_kernels.stitched_linear(x, inp["weight"], inp["bias"], a, b, sb, inp["stitch_ids"], scale=0.7,
                                            backend=backend)

    assert torch.autograd.gradgradcheck(f, tuple(inp[n] for n in names))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_in_features_gives_the_biases(backend, poison_empty):
    """K = 0, as F.linear: y = bias (+ the stitch bias; the LoRA adds nothing); dx is (M, 0)."""
    inp = make_inputs(7, 0, 9, 2, 3, ids="rows", requires_grad=True)
    y = esta_kernels.stitched_linear(**inp, backend=backend)
    torch.testing.assert_close(y.double(), reference(inp, 1.0))
    y.sum().backward()
    assert inp["x"].grad.shape == (7, 0) and inp["lora_a"].grad.shape == (2, 0)
    torch.testing.assert_close(inp["lora_b"].grad, torch.zeros(9, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_integer_ids_equal_int_ids(backend):
    import numpy as np

    inp = make_inputs(5, 8, 6, 2, 4, ids="none")
    want = esta_kernels.stitched_linear(**{**inp, "stitch_ids": 3}, backend=backend)
    for value in (np.int64(3), np.int32(3), np.uint8(3)):
        torch.testing.assert_close(esta_kernels.stitched_linear(**{**inp, "stitch_ids": value}, backend=backend), want)
    with pytest.raises(IndexError, match=r"outside \[-1, 4\)"):
        esta_kernels.stitched_linear(**{**inp, "stitch_ids": np.int64(4)}, backend=backend)


# ------------------------------------------------------------------------------------ GPU backends only
def _cuda_inputs(M, K, N, r, S, dtype, ids, **kw):
    return make_inputs(M, K, N, r, S, dtype=dtype, device="cuda", ids=ids, **kw)


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
    lowp = 0.0 if dtype == torch.float32 else lowp_error(inp, 1.5, ref)
    _assert_close(out, ref, "cuda", dtype, lowp)
    inp["x"] = torch.randn(K, 30, device="cuda").to(dtype).t()  # column-major
    inp["weight"] = torch.randn(2 * N, K, device="cuda").to(dtype)[::2] / K**0.5
    ref = reference(inp, 1.5)
    out = esta_kernels.stitched_linear(**inp, scale=1.5, backend=backend)
    lowp = 0.0 if dtype == torch.float32 else lowp_error(inp, 1.5, ref)
    _assert_close(out, ref, "cuda", dtype, lowp)


@gpu
@needs_cuda
# The cuda backend checks device ids without a host sync: a bad one raises a device-side assertion, which
# ends the CUDA context (tests/kernels/test_cuda_backend.py checks it in a child process).
@pytest.mark.parametrize("backend", [p for p in GPU_BACKENDS if p.id != "cuda"])
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
