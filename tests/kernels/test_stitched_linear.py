"""The fused stitched linear on every backend testable here, against the float64 torch reference."""
import pytest
import torch

import esta_kernels
from _inputs import lowp_error, make_inputs, reference, reference_grads

CPU_BACKENDS = [b for b in ("torch", "cpu", "triton") if b in esta_kernels.available_backends()]


def _marks(backend):
    return [pytest.mark.interpreter] if backend == "triton" else []


BACKENDS = [pytest.param(b, marks=_marks(b), id=b) for b in CPU_BACKENDS]
# (dtype, atol, rtol): float32 against float64 is tight; float16 is judged against torch's own float16 error.
# The torch reference computes in float32 whatever the input dtype, so float16 adds nothing for it.
_DTYPES = [(torch.float32, 2e-5, 2e-5, "f32"), (torch.float16, 1e-2, 1e-2, "f16")]
BACKEND_DTYPES = [
    pytest.param(b, dt, atol, rtol, marks=_marks(b), id=f"{b}-{name}")
    for b in CPU_BACKENDS for dt, atol, rtol, name in _DTYPES
    if not (b == "torch" and dt == torch.float16)
]
SHAPES = [(1, 37, 45), (7, 16, 33), (130, 37, 45), (66, 129, 70)]


def _check_close(out, ref, atol, rtol, lowp_err=None):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "unwritten or non-finite output elements"
    err = (out.double() - ref).abs()
    bound = atol + rtol * ref.abs()
    if lowp_err is not None:
        bound = bound + 2 * lowp_err
    assert (err <= bound).all(), f"max err {err.max().item():.3g} (torch's own low-precision error {lowp_err})"


@pytest.mark.parametrize("backend,dtype,atol,rtol", BACKEND_DTYPES)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("r", [1, 16])
@pytest.mark.parametrize("ids", ["rows", "int", "none"])
def test_forward(backend, dtype, atol, rtol, M, K, N, r, ids, poison_empty):
    inp = make_inputs(M, K, N, r, 5, dtype=dtype, ids=ids)
    scale = 0.75
    ref = reference(inp, scale)
    out = esta_kernels.stitched_linear(**inp, scale=scale, backend=backend)
    assert out.dtype == dtype
    _check_close(out, ref, atol, rtol, lowp_error(inp, scale, ref) if dtype != torch.float32 else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lora,bias,S", [(False, True, 5), (True, False, 5), (True, True, None), (False, False, None)])
def test_forward_optional_parts(backend, lora, bias, S):
    inp = make_inputs(33, 37, 45, 4, S, lora=lora, bias=bias, ids="rows" if S else "none")
    ref = reference(inp, 2.0)
    out = esta_kernels.stitched_linear(**inp, scale=2.0, backend=backend)
    _check_close(out, ref, 2e-5, 2e-5)


@pytest.mark.parametrize("backend,dtype,atol,rtol", BACKEND_DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 37, 45), (130, 37, 45)])
@pytest.mark.parametrize("r", [1, 16])
@pytest.mark.parametrize("ids", ["rows", "int"])
def test_backward(backend, dtype, atol, rtol, M, K, N, r, ids):
    inp = make_inputs(M, K, N, r, 5, dtype=dtype, ids=ids, param_dtype=torch.float32, requires_grad=True)
    scale = 0.5
    grad_y = torch.randn(M, N, dtype=torch.float64).to(dtype)
    y = esta_kernels.stitched_linear(**inp, scale=scale, backend=backend)
    y.backward(grad_y)
    ref = reference_grads(inp, scale, grad_y)
    for name, g_ref in ref.items():
        g = inp[name].grad
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == inp[name].dtype and g.shape == inp[name].shape
        tol = atol * (1 + g_ref.abs().max().item()) * (4 if dtype == torch.float16 else 1)
        _check_close(g, g_ref, tol, rtol)


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
def test_zero_rows(backend):
    inp = make_inputs(0, 16, 24, 4, 3, ids="rows", requires_grad=True)
    y = esta_kernels.stitched_linear(**inp, backend=backend)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert inp["x"].grad.shape == (0, 16)
    assert inp["lora_a"].grad.abs().sum() == 0
    assert inp["stitch_bias"].grad.abs().sum() == 0


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
