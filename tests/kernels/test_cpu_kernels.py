"""The C++ CPU kernels (csrc/cpu/stitched_linear.cpp) called directly, against the float64 torch reference."""
import pytest
import torch

import esta_kernels
from esta_kernels import _ext

pytestmark = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="esta_kernels._C is not built")

fwd_op = torch.ops.esta.stitched_linear
bwd_op = torch.ops.esta.stitched_linear_backward

S = 5
# Tests that take the poison_empty fixture (tests/conftest.py) run with at::empty filling new tensors with
# NaN, so an output element the kernels forget to write fails.
# (dtype, atol, rtol). Half types: the GEMMs run in the half type, the rest in float32 with one rounding.
DTYPES = [
    pytest.param(torch.float64, 1e-10, 1e-10, id="f64"),
    pytest.param(torch.float32, 1e-4, 1e-4, id="f32"),
    pytest.param(torch.bfloat16, 5e-2, 3e-2, id="bf16"),
    pytest.param(torch.float16, 1e-2, 1e-2, id="f16"),
]


def _inputs(M, K, N, r, dtype, *, ids="rows", bias=True, stitch=True, param_dtype=None, gen=None):
    gen = gen or torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    pdt = param_dtype or dtype

    def rnd(*shape, dt=dtype, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dt)

    x = rnd(M, K)
    w = rnd(N, K, s=K ** -0.5)
    b = rnd(N) if bias else None
    la = rnd(r, K, dt=pdt, s=K ** -0.5) if r else None
    lb = rnd(N, r, dt=pdt, s=r ** -0.5) if r else None
    sb = rnd(S, N, dt=pdt) if stitch else None
    if ids == "rows":
        idt = torch.randint(-1, S, (M,), generator=gen)
        if M > 1:
            idt[0], idt[1] = -1, S - 1
    elif ids == "one":
        idt = torch.tensor([int(torch.randint(0, S, (1,), generator=gen))])
    elif ids == "minus1":
        idt = torch.tensor([-1])
    else:
        idt = None
    return x, w, b, la, lb, sb, idt


def _f64(t):
    return None if t is None else t.detach().to(torch.float64)


def _reference(x, w, b, la, lb, sb, ids, scale, dy):
    """float64 forward and gradients of x, lora_a, lora_b, stitch_bias via autograd on the torch reference."""
    leaves = [_f64(t) for t in (x, la, lb, sb)]
    for t in leaves:
        if t is not None:
            t.requires_grad_(True)
    xr, lar, lbr, sbr = leaves
    y = esta_kernels.torch_stitched_linear(xr, _f64(w), _f64(b), lar, lbr, sbr, ids, scale=scale)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(torch.float64), allow_unused=True)
    it = iter(grads)
    return y.detach(), [None if t is None else next(it) for t in leaves]


def _close(out, ref, atol, rtol, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    torch.testing.assert_close(out.to(torch.float64), ref, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 130])
@pytest.mark.parametrize("r", [1, 16])
@pytest.mark.parametrize("ids", ["rows", "one", "minus1"])
def test_forward_and_backward_match_reference(dtype, atol, rtol, M, r, ids, poison_empty):
    K, N, scale = 37, 45, 0.75
    x, w, b, la, lb, sb, idt = _inputs(M, K, N, r, dtype, ids=ids)
    y, xa = fwd_op(x, w, b, la, lb, sb, idt, scale)
    dy = torch.randn(M, N, dtype=torch.float64).to(dtype)
    y_ref, (dx_ref, da_ref, db_ref, ds_ref) = _reference(x, w, b, la, lb, sb, idt, scale, dy)
    assert y.dtype == dtype and xa.dtype == _acc(dtype)
    _close(y, y_ref, atol, rtol, "y")
    _close(xa, x.double() @ la.double().t(), atol, rtol, "lora_xa")

    dx, da, db, ds = bwd_op(dy, x, w, la, lb, xa, idt, S, scale, [True, True, True, True])
    assert dx.dtype == dtype and da.dtype == db.dtype == ds.dtype == _acc(dtype)
    # Gradients sum over M rows: scale the tolerance of the low-precision types with the row count.
    grow = 1.0 if dtype == torch.float64 else max(1.0, M ** 0.5)
    _close(dx, dx_ref, atol, rtol, "dx")
    _close(da, da_ref, atol * grow, rtol, "d_lora_a")
    _close(db, db_ref, atol * grow, rtol, "d_lora_b")
    _close(ds, ds_ref, atol * grow, rtol, "d_stitch_bias")


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("ids", ["rows", "one"])
def test_vector_path_and_row_blocks(dtype, atol, rtol, ids, poison_empty):
    """N = 150 spans two full vector chunks plus a scalar tail (float32: 64 columns per chunk, float64: 32);
    an odd M leaves a row outside the two-row tiles, and M > 512 crosses the half types' row blocks."""
    M, K, N, r, scale = 1031, 37, 150, 16, 1.25
    x, w, b, la, lb, sb, idt = _inputs(M, K, N, r, dtype, ids=ids)
    y, xa = fwd_op(x, w, b, la, lb, sb, idt, scale)
    dy = torch.randn(M, N, dtype=torch.float64).to(dtype)
    y_ref, refs = _reference(x, w, b, la, lb, sb, idt, scale, dy)
    _close(y, y_ref, atol, rtol, "y")
    grads = bwd_op(dy, x, w, la, lb, xa, idt, S, scale, [True, True, True, True])
    grow = 1.0 if dtype == torch.float64 else M ** 0.5
    for name, g, ref, tol in zip(("dx", "d_lora_a", "d_lora_b", "d_stitch_bias"), grads, refs, (1, grow, grow, grow)):
        _close(g, ref, atol * tol, rtol, name)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2])
@pytest.mark.parametrize("lora,bias,stitch,ids", [
    (False, True, True, "rows"),   # no LoRA
    (True, False, True, "rows"),   # no bias
    (True, True, True, "none"),    # stitch bias without ids adds nothing
    (True, True, False, "none"),   # no stitch bias
    (False, False, False, "none"),  # plain x @ W.T
    (False, False, True, "one"),
])
def test_optional_parts(dtype, atol, rtol, lora, bias, stitch, ids, poison_empty):
    M, K, N, r = 33, 37, 45, (3 if lora else 0)
    x, w, b, la, lb, sb, idt = _inputs(M, K, N, r, dtype, ids=ids, bias=bias, stitch=stitch)
    y, xa = fwd_op(x, w, b, la, lb, sb, idt, 2.0)
    assert xa.shape == (M, r)
    dy = torch.randn(M, N, dtype=dtype)
    y_ref, (dx_ref, da_ref, db_ref, ds_ref) = _reference(x, w, b, la, lb, sb, idt, 2.0, dy)
    _close(y, y_ref, atol, rtol, "y")
    nst = S if stitch else 0
    dx, da, db, ds = bwd_op(dy, x, w, la, lb, xa, idt, nst, 2.0, [True, True, True, True])
    _close(dx, dx_ref, atol, rtol, "dx")
    if lora:
        _close(da, da_ref, atol, rtol, "d_lora_a")
        _close(db, db_ref, atol, rtol, "d_lora_b")
    else:
        assert da.shape == (0,) and db.shape == (0,)
    if stitch:
        _close(ds, ds_ref if idt is not None else torch.zeros(S, N, dtype=torch.float64), atol, rtol, "d_stitch_bias")
    else:
        assert ds.shape == (0, N)


def test_float32_parameters_with_float64_and_half_inputs():
    for dtype, tol in ((torch.float64, 1e-6), (torch.bfloat16, 5e-2)):
        x, w, b, la, lb, sb, idt = _inputs(19, 37, 45, 4, dtype, param_dtype=torch.float32)
        y, xa = fwd_op(x, w, b, la, lb, sb, idt, 1.5)
        dy = torch.randn(19, 45, dtype=dtype)
        y_ref, grads_ref = _reference(x, w, b, la, lb, sb, idt, 1.5, dy)
        _close(y, y_ref, tol, tol, "y")
        grads = bwd_op(dy, x, w, la, lb, xa, idt, S, 1.5, [True, True, True, True])
        for name, g, ref in zip(("dx", "d_lora_a", "d_lora_b", "d_stitch_bias"), grads, grads_ref):
            _close(g, ref, tol, tol, name)


def test_non_contiguous_x_and_grad_y():
    M, K, N, r = 29, 37, 45, 4
    x, w, b, la, lb, sb, idt = _inputs(M, K, N, r, torch.float64)
    xt = x.t().contiguous().t()  # column-major
    xs = torch.randn(M, 2 * K, dtype=torch.float64)[:, ::2].copy_(x)  # column stride 2
    dy = torch.randn(N, M, dtype=torch.float64).t()
    y_ref, grads_ref = _reference(x, w, b, la, lb, sb, idt, 0.5, dy)
    for xv in (xt, xs):
        y, xa = fwd_op(xv, w, b, la, lb, sb, idt, 0.5)
        _close(y, y_ref, 1e-10, 1e-10, "y")
        grads = bwd_op(dy, xv, w, la, lb, xa, idt, S, 0.5, [True, True, True, True])
        for name, g, ref in zip(("dx", "d_lora_a", "d_lora_b", "d_stitch_bias"), grads, grads_ref):
            _close(g, ref, 1e-10, 1e-10, name)


@pytest.mark.parametrize("mask", [[True, False, False, False], [False, True, True, False], [False, False, False, True]])
def test_backward_output_mask(mask):
    M, K, N, r = 17, 37, 45, 3
    x, w, b, la, lb, sb, idt = _inputs(M, K, N, r, torch.float64)
    _, xa = fwd_op(x, w, b, la, lb, sb, idt, 1.0)
    dy = torch.randn(M, N, dtype=torch.float64)
    _, refs = _reference(x, w, b, la, lb, sb, idt, 1.0, dy)
    outs = bwd_op(dy, x, w, la, lb, xa, idt, S, 1.0, mask)
    for want, out, ref in zip(mask, outs, refs):
        if want:
            _close(out, ref, 1e-10, 1e-10, "grad")
        else:
            assert out.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sums_over_rows_do_not_depend_on_thread_count(dtype):
    """d stitch_bias (and, for float32/float64, whose d lora_b is our own pass rather than BLAS, d lora_b) are
    sums over the rows: bitwise the same with 1 and 3 threads."""
    M, K, N, r = 3001, 8, 300, 4
    x, w, _, la, lb, _, ids = _inputs(M, K, N, r, dtype)
    _, xa = fwd_op(x, w, None, la, lb, None, None, 1.0)
    dy = torch.randn(M, N).to(dtype)
    mask = [False, False, True, True]
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, _, db1, ds1 = bwd_op(dy, x, w, la, lb, xa, ids, S, 1.0, mask)
        torch.set_num_threads(3)
        _, _, db3, ds3 = bwd_op(dy, x, w, la, lb, xa, ids, S, 1.0, mask)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(ds1, ds3)
    if dtype == torch.float32:
        assert torch.equal(db1, db3)
    ref = torch.zeros(S, N, dtype=torch.float64).index_add_(0, ids.clamp(min=0), dy.double() * (ids >= 0)[:, None])
    torch.testing.assert_close(ds1.double(), ref, atol=1e-3, rtol=1e-5)


def test_gradcheck_through_functional_api():
    M, K, N, r = 6, 5, 7, 2
    x, w, b, la, lb, sb, idt = _inputs(M, K, N, r, torch.float64)
    for t in (x, la, lb, sb):
        t.requires_grad_(True)

    def f(x, la, lb, sb):
        return esta_kernels.stitched_linear(x, w, b, la, lb, sb, idt, scale=0.7, backend="cpu")

    assert torch.autograd.gradcheck(f, (x, la, lb, sb))
    # one broadcast int id
    assert torch.autograd.gradcheck(
        lambda x, la, lb, sb: esta_kernels.stitched_linear(x, w, b, la, lb, sb, 3, scale=0.7, backend="cpu"),
        (x, la, lb, sb))


@pytest.mark.parametrize("ids", ["rows", "one", "none"])
def test_opcheck(ids):
    x, w, b, la, lb, sb, idt = _inputs(9, 37, 45, 4, torch.float32, ids=ids)
    torch.library.opcheck(fwd_op, (x, w, b, la, lb, sb, idt, 0.5))
    _, xa = fwd_op(x, w, b, la, lb, sb, idt, 0.5)
    dy = torch.randn(9, 45)
    for mask in ([True, True, True, True], [False, True, False, True]):
        torch.library.opcheck(bwd_op, (dy, x, w, la, lb, xa, idt, S, 0.5, mask))
    torch.library.opcheck(bwd_op, (dy, x, w, None, None, torch.empty(9, 0), idt, S, 0.5, [True, True, True, True]))


# ------------------------------------------------------------------------------------------- bad inputs

def _good():
    return list(_inputs(7, 37, 45, 4, torch.float32))


@pytest.mark.parametrize("bad_id", [S, -2, 10**12, -(10**12)])
@pytest.mark.parametrize("single", [False, True])
def test_ids_out_of_range_raise_index_error(bad_id, single):
    x, w, b, la, lb, sb, idt = _good()
    idt = torch.tensor([bad_id]) if single else idt.clone()
    if not single:
        idt[3] = bad_id
    with pytest.raises(IndexError, match=rf"stitch_ids\[\d+\] = {bad_id} is outside \[-1, {S}\)"):
        fwd_op(x, w, b, la, lb, sb, idt, 1.0)
    dy = torch.randn(7, 45)
    with pytest.raises(IndexError, match="is outside"):
        bwd_op(dy, x, w, la, lb, torch.zeros(7, 4), idt, S, 1.0, [True, True, True, True])


@pytest.mark.parametrize("case,exc,match", [
    ("ids_int32", TypeError, "stitch_ids must be an int64 tensor"),
    ("ids_len", ValueError, "stitch_ids must be 1-D with M = 7"),
    ("ids_2d", ValueError, "stitch_ids must be 1-D"),
    ("x_int", TypeError, "x must be float32, float64, float16 or bfloat16"),
    ("w_dtype", TypeError, "x and weight must share one dtype"),
    ("x_3d", ValueError, r"x must be 2-D \(M, K\)"),
    ("k_mismatch", ValueError, "must equal weight's in_features K"),
    ("bias_shape", ValueError, r"bias must have shape \(45,\)"),
    ("bias_dtype", TypeError, "bias must have x's dtype"),
    ("lora_half", ValueError, "lora_a and lora_b must be given together"),
    ("lora_a_shape", ValueError, r"lora_a must have shape \(r, K\)"),
    ("lora_b_shape", ValueError, r"lora_b must have shape \(N, r\)"),
    ("lora_dtype", TypeError, "lora_b must be float32, got float64"),
    ("sb_shape", ValueError, r"stitch_bias must have shape \(S, N\)"),
    ("sb_dtype", TypeError, "stitch_bias must be float32, got float64"),
])
def test_bad_forward_arguments(case, exc, match):
    x, w, b, la, lb, sb, idt = _good()
    if case == "ids_int32":
        idt = idt.int()
    elif case == "ids_len":
        idt = idt[:5]
    elif case == "ids_2d":
        idt = idt.view(7, 1)
    elif case == "x_int":
        x = x.int()
    elif case == "w_dtype":
        w = w.double()
    elif case == "x_3d":
        x = x.view(1, 7, 37)
    elif case == "k_mismatch":
        x = torch.randn(7, 36)
    elif case == "bias_shape":
        b = b[:44]
    elif case == "bias_dtype":
        b = b.double()
    elif case == "lora_half":
        lb = None
    elif case == "lora_a_shape":
        la = la[:, :36]
    elif case == "lora_b_shape":
        lb = lb[:, :3]
    elif case == "lora_dtype":
        lb = lb.double()
    elif case == "sb_shape":
        sb = sb[:, :44]
    elif case == "sb_dtype":
        sb = sb.double()
    with pytest.raises(exc, match=match):
        fwd_op(x, w, b, la, lb, sb, idt, 1.0)


def test_bad_backward_arguments():
    x, w, b, la, lb, sb, idt = _good()
    _, xa = fwd_op(x, w, b, la, lb, sb, idt, 1.0)
    dy = torch.randn(7, 45)
    mask = [True, True, True, True]
    with pytest.raises(ValueError, match=r"grad_y must have shape \(M, N\) = \(7, 45\)"):
        bwd_op(dy[:6], x, w, la, lb, xa, idt, S, 1.0, mask)
    with pytest.raises(TypeError, match="grad_y must have x's dtype"):
        bwd_op(dy.double(), x, w, la, lb, xa, idt, S, 1.0, mask)
    with pytest.raises(TypeError, match="lora_xa must be float32"):
        bwd_op(dy, x, w, la, lb, xa.double(), idt, S, 1.0, mask)
    with pytest.raises(ValueError, match=r"lora_xa must have shape \(M, r\)"):
        bwd_op(dy, x, w, la, lb, xa[:, :3], idt, S, 1.0, mask)
    with pytest.raises(ValueError, match="num_stitches must be >= 0"):
        bwd_op(dy, x, w, la, lb, xa, idt, -1, 1.0, mask)
