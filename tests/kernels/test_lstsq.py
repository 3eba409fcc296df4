"""The least-squares stitching init: the fused accumulation op, StreamingLstsq / lstsq_init /
MultiTargetLstsq against numpy's float64 lstsq, StitchingLayer, and bad inputs."""
import numpy as np
import pytest
import torch

import esta_kernels
from esta.nn import StitchedLinear, StitchingLayer
from esta_kernels import _lstsq_ops
from esta_kernels.lstsq import lstsq_accumulate
from esta_kernels.reference import torch_lstsq_accumulate

AVAILABLE = esta_kernels.available_backends()


def _triton_lstsq_importable() -> bool:
    try:
        import esta_kernels.triton.lstsq  # noqa: F401
    except Exception:  # the Triton kernel is written separately; leave it out until it imports
        return False
    return True


BACKENDS = [pytest.param("torch", id="torch")]
if "cpu" in AVAILABLE and _lstsq_ops.has_cpu_kernel():
    BACKENDS.append(pytest.param("cpu", id="cpu"))
if "triton" in AVAILABLE and _triton_lstsq_importable():
    BACKENDS.append(pytest.param("triton", marks=pytest.mark.interpreter, id="triton"))
OP_BACKENDS = [p for p in BACKENDS if p.values[0] != "torch"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["f32", "f16", "bf16", "f64"]


def _skip_unsupported(backend, *dtypes):
    if backend == "triton" and torch.float64 in dtypes:
        pytest.skip("the triton backend rejects float64 (test_triton_backend_rejects_float64 checks the error)")
    if backend == "triton" and torch.bfloat16 in dtypes and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter has no bfloat16 (the GPU tests cover it)")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _np_lstsq(h_in, h_out, bias=True):
    """numpy's float64 minimum-norm least squares on the (rounded) inputs: (W (out, in), b (out,))."""
    x = h_in.reshape(-1, h_in.shape[-1]).double().numpy()
    y = h_out.reshape(-1, h_out.shape[-1]).double().numpy()
    if bias:
        x = np.concatenate([x, np.ones((x.shape[0], 1))], 1)
    sol = np.linalg.lstsq(x, y, rcond=None)[0]
    if bias:
        return sol[:-1].T, sol[-1]
    return sol.T, None


def _rel_err(w, b, w_ref, b_ref):
    """||[W, b] - [W_ref, b_ref]||_F / ||[W_ref, b_ref]||_F (b omitted when None)."""
    got = [torch.as_tensor(w).double().reshape(-1)]
    ref = [torch.as_tensor(w_ref).double().reshape(-1)]
    if b_ref is not None:
        got.append(torch.as_tensor(b).double().reshape(-1))
        ref.append(torch.as_tensor(b_ref).double().reshape(-1))
    got, ref = torch.cat(got), torch.cat(ref)
    return float((got - ref).norm() / ref.norm())


def _linear_data(n, d_in, d_out, seed, offset=0.0, noise=0.1, lead=()):
    g = _gen(seed)
    x = torch.randn(*lead, n, d_in, generator=g) + offset
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, generator=g)
    y = (x - offset) @ w.t() + b + noise * torch.randn(*lead, n, d_out, generator=g)
    return x, y


# ------------------------------------------------------------------------------------------- the op
@pytest.mark.parametrize("backend", OP_BACKENDS + [pytest.param("torch", id="torch")])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,d_in,d_out", [(0, 5, 7), (1, 33, 19), (37, 5, 19), (1500, 33, 7)])
def test_accumulate_matches_float64(backend, dtype, n, d_in, d_out, poison_empty):
    _skip_unsupported(backend, dtype)
    g = _gen(n + d_in)
    h_in = (torch.randn(n, d_in, generator=g) * 3 + 2).to(dtype)
    h_out = (torch.randn(n, d_out, generator=g) - 1).to(dtype)
    shift_in = torch.randn(d_in, generator=g) + 2
    shift_out = torch.randn(d_out, generator=g) - 1
    gram, cross = lstsq_accumulate(h_in, h_out, shift_in, shift_out, backend=backend)
    ref_g, ref_c = torch_lstsq_accumulate(h_in, h_out, shift_in, shift_out)  # float64 on the rounded inputs
    assert gram.dtype == cross.dtype == torch.float64
    assert gram.shape == (d_in + 1, d_in + 1) and cross.shape == (d_in + 1, d_out)
    assert torch.equal(gram, gram.t())
    assert gram[-1, -1].item() == n
    # float32 products over <= 1024-row blocks: relative to the largest entry (float64 inputs: exact-ish)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    scale_g = max(ref_g.abs().max().item(), 1.0)
    scale_c = max(ref_c.abs().max().item(), 1.0)
    assert (gram - ref_g).abs().max().item() <= tol * scale_g
    assert (cross - ref_c).abs().max().item() <= tol * scale_c


@pytest.mark.parametrize("backend", OP_BACKENDS + [pytest.param("torch", id="torch")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=["f32", "f16", "f64"])
@pytest.mark.parametrize("n", [1, 1024, 1025, 2600])
def test_accumulate_block_shifts(backend, dtype, n, poison_empty):
    """2-D shifts: the rows of block b (of 1024 rows) are centred by row b; blocks far apart stay exact."""
    _skip_unsupported(backend, dtype)
    g = _gen(n)
    blocks = -(-n // 1024)
    offsets = torch.tensor([0.0, 1e4, -3e3][:blocks]).repeat_interleave(1024)[:n, None]
    h_in = (torch.randn(n, 9, generator=g) + offsets).to(dtype)
    h_out = (torch.randn(n, 4, generator=g) - offsets).to(dtype)
    shift_in = torch.stack([h_in[i:i + 1024].double().mean(0) for i in range(0, n, 1024)])
    shift_out = torch.stack([h_out[i:i + 1024].double().mean(0) for i in range(0, n, 1024)])
    shift_dtype = torch.float64 if dtype == torch.float64 and backend != "triton" else torch.float32
    shift_in, shift_out = shift_in.to(shift_dtype), shift_out.to(shift_dtype)
    gram, cross = lstsq_accumulate(h_in, h_out, shift_in, shift_out, backend=backend)
    ref_g, ref_c = torch_lstsq_accumulate(h_in, h_out, shift_in, shift_out)
    # each block centred by its own mean: entries of the size n * variance, not n * offset^2; the error
    # bound is float32's roundoff over 1024-row sums of |ua_i| |c_j| (the reference of |u| and |v|)
    abs_g, abs_c = torch_lstsq_accumulate(h_in.double().abs(), h_out.double().abs(), -shift_in.abs(),
                                          -shift_out.abs())
    unit = 1e-14 if dtype == torch.float64 else 64 * 2.0 ** -24
    assert ((gram - ref_g).abs() - unit * abs_g).max().item() <= 0
    assert ((cross - ref_c).abs() - unit * abs_c).max().item() <= 0
    assert ref_g[:9, :9].diagonal().max() < 3 * n  # centred per block
    with pytest.raises(ValueError, match=r"shift_in must have shape \(9,\) or"):
        lstsq_accumulate(h_in, h_out, shift_in[:, :8], shift_out, backend=backend)
    if blocks > 1:
        with pytest.raises(ValueError, match="one row per block of 1024 rows"):
            lstsq_accumulate(h_in, h_out, shift_in[:-1], shift_out, backend=backend)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_accumulate_strided_and_mixed_dtypes(backend):
    g = _gen(3)
    h_in = torch.randn(40, 66, generator=g)[::2, ::2]  # (20, 33), non-contiguous
    h_out = torch.randn(19, 20, generator=g).t().to(torch.float16)  # (20, 19), transposed
    s_in, s_out = torch.zeros(33), torch.full((19,), 0.5)
    gram, cross = lstsq_accumulate(h_in, h_out, s_in, s_out, backend=backend)
    ref_g, ref_c = torch_lstsq_accumulate(h_in, h_out, s_in, s_out)
    torch.testing.assert_close(gram, ref_g, rtol=0, atol=1e-5)
    torch.testing.assert_close(cross, ref_c, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_accumulate_opcheck(backend):
    g = _gen(5)
    dtype = torch.float16 if backend == "triton" else torch.float32
    args = (torch.randn(37, 5, generator=g).to(dtype), torch.randn(37, 7, generator=g).to(dtype),
            torch.randn(5, generator=g), torch.randn(7, generator=g))
    torch.library.opcheck(_lstsq_ops.ACCUMULATE_OPS[backend], args)
    if backend == "cpu":
        wide = tuple(a.double() for a in args)
        torch.library.opcheck(_lstsq_ops.ACCUMULATE_OPS[backend], wide)


# --------------------------------------------------------------------------------- the solve
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 100.0], ids=["centred", "offset100"])
@pytest.mark.parametrize("d_in,d_out", [(5, 19), (33, 7)])
def test_solve_matches_numpy(backend, offset, d_in, d_out):
    x, y = _linear_data(1500, d_in, d_out, seed=d_in, offset=offset)
    w, b = esta_kernels.lstsq_init(x, y, backend=backend)
    assert w.dtype == b.dtype == torch.float32 and w.shape == (d_out, d_in) and b.shape == (d_out,)
    w_ref, b_ref = _np_lstsq(x, y)
    assert _rel_err(w, b, w_ref, b_ref) <= 1e-4
    assert _rel_err(w, None, w_ref, None) <= 1e-4  # W on its own, too


def test_shift_matters():
    """Without the shift, float32 products of data at mean 100 lose the variance; with it, 1e-4 holds."""
    x, y = _linear_data(1500, 33, 7, seed=1, offset=100.0)
    w_ref, b_ref = _np_lstsq(x, y)
    solver = esta_kernels.StreamingLstsq(33, 7, backend="cpu" if "cpu" in AVAILABLE else "torch")
    solver.update(x, y)
    assert solver.stats.mean_in.sub(100).abs().max() < 0.2
    w, b = solver.solve()
    assert _rel_err(w, b, w_ref, b_ref) <= 1e-4
    # The same stats unshifted (computed by float32 block products, as a kernel without the shift would):
    xa = torch.cat([x, torch.ones(1500, 1)], 1)
    gram = sum((blk.t() @ blk).double() for blk in xa.split(1024))
    cross = sum((blk.t() @ yb).double() for blk, yb in zip(xa.split(1024), y.split(1024)))
    counts, sums_in = esta_kernels.lstsq.block_sums(x)
    _, sums_out = esta_kernels.lstsq.block_sums(y)
    zero_in, zero_out = torch.zeros(len(counts), 33), torch.zeros(len(counts), 7)
    stats = esta_kernels.lstsq.batch_stats(gram, cross, counts, sums_in, sums_out, zero_in, zero_out)
    w0, b0 = esta_kernels.lstsq.solve_from_stats(stats)
    assert _rel_err(w0, b0, w_ref, b_ref) > 1e-3


def _drifting_batches(shift, kind, seed, d_in=24, d_out=10, rows=700):
    """Batches of one linear map whose inputs move `shift` standard deviations away from the first batch's
    mean: "drift" (batch k at k/5 of the shift), "alternate" (0, shift, 0, shift/2, ...), "mixed" (batches
    of 2500 rows whose blocks of 1024 rows lie at different shifts)."""
    g = _gen(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    out = []
    for k in range(6):
        if kind == "drift":
            offsets = [shift * k / 5]
        elif kind == "alternate":
            offsets = [0.0 if k % 2 == 0 else shift / (1 + k // 2)]
        else:
            offsets = [shift * ((k + j) % 3) / 2 for j in range(3)]
        parts = []
        for j, off in enumerate(offsets):
            n = rows if kind != "mixed" else (1024 if j < 2 else 452)
            parts.append(torch.randn(n, d_in, generator=g, dtype=torch.float64) + 3 + off)
        x = torch.cat(parts).float()
        y = (x.double() @ w.T + b + 0.01 * torch.randn(len(x), d_out, generator=g, dtype=torch.float64)).float()
        out.append((x, y))
    return out


def _far_cases():
    """Every shift and batch kind on the C++ and torch backends; under Triton's interpreter (slow: numpy per
    program) the extreme shift of each kind, the op's block shifts being tested on their own above."""
    cases = []
    for p in BACKENDS:
        backend = p.values[0]
        for kind in ("drift", "alternate", "mixed"):
            for shift, sid in ((0.0, "0"), (100.0, "1e2"), (1e3, "1e3"), (1e4, "1e4")):
                if backend == "triton" and shift != 1e4:
                    continue
                cases.append(pytest.param(backend, kind, shift, marks=p.marks, id=f"{sid}-{kind}-{backend}"))
    return cases


@pytest.mark.parametrize("backend,kind,shift", _far_cases())
def test_streamed_batches_far_from_the_first_match_numpy(backend, kind, shift):
    """The accuracy does not depend on how far later batches (or later blocks of a batch) lie from the
    first: the per-block centring and the float64 merge leave nothing to cancel (issue: at 1e3 and 1e4
    standard deviations the weight's relative error was 0.46 and 0.97 on the cpu backend)."""
    batches = _drifting_batches(shift, kind, seed=int(shift) % 97 + len(kind))
    solver = esta_kernels.StreamingLstsq(24, 10, backend=backend)
    for x, y in batches:
        solver.update(x, y)
    w_ref, b_ref = _np_lstsq(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    w, b = solver.solve()
    assert _rel_err(w, None, w_ref, None) <= 2e-6
    assert _rel_err(w, b, w_ref, b_ref) <= 2e-6


def test_merge_is_exact_in_float64():
    """Merging the stats of two halves equals the stats of the whole (float64 inputs: to rounding)."""
    x, y = _linear_data(900, 7, 4, seed=21, offset=50.0)
    x, y = x.double(), y.double()
    whole = esta_kernels.StreamingLstsq(7, 4).update(x, y).stats
    parts = esta_kernels.StreamingLstsq(7, 4).update(x[:300] + 0, y[:300]).update(x[300:], y[300:]).stats
    xc, yc = x - x.mean(0), y - y.mean(0)
    for got in (whole, parts):
        assert got.n == 900
        torch.testing.assert_close(got.mean_in, x.mean(0), rtol=1e-14, atol=1e-12)
        torch.testing.assert_close(got.sxx, xc.T @ xc, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(got.sxy, xc.T @ yc, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_equals_one_shot(backend):
    x, y = _linear_data(1000, 33, 19, seed=7, offset=3.0)
    one = esta_kernels.StreamingLstsq(33, 19, backend=backend).update(x, y)
    streamed = esta_kernels.StreamingLstsq(33, 19, backend=backend)
    for lo, hi in [(0, 1), (1, 38), (38, 38), (38, 500), (500, 1000)]:  # an empty and a 1-row batch too
        streamed.update(x[lo:hi], y[lo:hi])
    assert streamed.num_tokens == 1000 and streamed.num_updates == 5
    w1, b1 = one.solve()
    w2, b2 = streamed.solve()
    assert _rel_err(w2, b2, w1, b1) <= 1e-5
    w_ref, b_ref = _np_lstsq(x, y)
    assert _rel_err(w2, b2, w_ref, b_ref) <= 1e-4


def test_three_d_inputs():
    x, y = _linear_data(37, 33, 7, seed=11, lead=(4,))  # (4, 37, 33) -> 148 tokens
    w, b = esta_kernels.lstsq_init(x, y)
    w_ref, b_ref = _np_lstsq(x, y)
    assert _rel_err(w, b, w_ref, b_ref) <= 1e-4
    solver = esta_kernels.StreamingLstsq(33, 7).update(x, y.reshape(148, 7))  # leading shapes may differ
    assert solver.num_tokens == 148


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["duplicated", "few_tokens", "one_token", "constant_feature"])
def test_rank_deficient_gives_min_norm(backend, case):
    g = _gen(hash(case) % 1000)
    if case == "duplicated":
        base = torch.randn(300, 20, generator=g) + 5.0
        x = torch.cat([base, base[:, :5], 2 * base[:, 3:4]], 1)  # exact copies (2x is exact in float)
    elif case == "few_tokens":
        x = torch.randn(20, 33, generator=g) + 3.0
    elif case == "one_token":
        x = torch.randn(1, 33, generator=g)
    else:
        x = torch.randn(200, 10, generator=g)
        x[:, 4] = 7.0  # collinear with the ones column
    y = torch.randn(x.shape[0], 7, generator=g)
    w, b = esta_kernels.lstsq_init(x, y, backend=backend)
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    w_ref, b_ref = _np_lstsq(x, y)
    assert _rel_err(w, b, w_ref, b_ref) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearly_collinear_takes_the_eigen_path(backend):
    """Two features equal up to 1e-6 relative noise (a 1e-12 relative eigenvalue of Cxx). Float32 stats cannot
    resolve that direction: it is dropped rather than inverted, so W stays small and the fit is as good as
    numpy's up to the one noise direction numpy also fits. Float64 stats (the torch backend) keep it, as numpy
    does, to the accuracy of float64 normal equations at kappa ~ 1e12."""
    g = _gen(21)
    x = torch.randn(400, 12, generator=g) + 2.0
    x = torch.cat([x, x[:, :1] * (1 + 1e-6 * torch.randn(400, 1, generator=g))], 1)
    y = x[:, :12] @ torch.randn(12, 5, generator=g) + 0.1 * torch.randn(400, 5, generator=g)
    solver = esta_kernels.StreamingLstsq(13, 5, backend=backend).update(x, y)
    w, b = solver.solve()
    w_ref, b_ref = _np_lstsq(x, y)
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    xd, yd = x.double(), y.double()
    resid = (xd @ w.double().t() + b.double() - yd).norm()
    resid_ref = (xd @ torch.from_numpy(w_ref).t() + torch.from_numpy(b_ref) - yd).norm()
    assert resid <= 1.01 * resid_ref
    if solver.eps_acc < 1e-10:
        # kappa(Cxx) ~ 1e12: float64 normal equations are good to ~kappa * 1e-16
        assert _rel_err(w, b, w_ref, b_ref) <= 1e-2
        return
    assert w.abs().max() < 10 and np.abs(w_ref).max() > 100
    torch.testing.assert_close(w[:, 0], w[:, 12], rtol=1e-4, atol=1e-5)  # the minimum norm splits it evenly


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_activations(backend, dtype):
    _skip_unsupported(backend, dtype)
    x, y = _linear_data(1500, 33, 19, seed=2, offset=1.0)
    x, y = x.to(dtype), y.to(dtype)
    w, b = esta_kernels.lstsq_init(x, y, backend=backend)
    w_ref, b_ref = _np_lstsq(x, y)  # numpy on the same rounded activations
    assert _rel_err(w, b, w_ref, b_ref) <= 1e-4


def test_float64_activations_are_exact():
    x, y = _linear_data(300, 33, 7, seed=4, offset=50.0)
    x, y = x.double(), y.double()
    w, b = esta_kernels.StreamingLstsq(33, 7).update(x, y).solve_float64()
    w_ref, b_ref = _np_lstsq(x, y)
    assert _rel_err(w, b, w_ref, b_ref) <= 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_target_equals_separate(backend):
    x, y1 = _linear_data(500, 33, 7, seed=5, offset=2.0)
    _, y2 = _linear_data(500, 33, 19, seed=6)
    multi = esta_kernels.StreamingLstsq.multi(33, [7, 19], backend=backend)
    for lo in range(0, 500, 200):
        multi.update(x[lo:lo + 200], [y1[lo:lo + 200], y2[lo:lo + 200].half()])
    sols = multi.solve_all()
    for i, y in enumerate((y1, y2.half())):
        single = esta_kernels.StreamingLstsq(33, y.shape[1], backend=backend).update(x, y).solve()
        w, b = multi.solve(i)
        assert torch.equal(w, sols[i][0]) and torch.equal(b, sols[i][1])
        assert _rel_err(w, b, *single) <= 1e-5
        assert _rel_err(w, b, *_np_lstsq(x, y)) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 4.0])
def test_no_bias(backend, offset):
    x, y = _linear_data(800, 33, 7, seed=8, offset=offset)
    solver = esta_kernels.StreamingLstsq(33, 7, bias=False, backend=backend)
    solver.update(x[:300], y[:300]).update(x[300:], y[300:])
    w, b = solver.solve()
    assert b is None and w.shape == (7, 33)
    assert _rel_err(w, None, *_np_lstsq(x, y, bias=False)) <= 1e-4
    # rank-deficient without the ones column: minimum norm as well
    xd = torch.cat([x[:20], x[:20, :4]], 1)
    wd, _ = esta_kernels.lstsq_init(xd, y[:20], bias=False, backend=backend)
    assert _rel_err(wd, None, *_np_lstsq(xd, y[:20], bias=False)) <= 1e-4


def test_ridge():
    x, y = _linear_data(400, 5, 7, seed=9)
    solver = esta_kernels.StreamingLstsq(5, 7).update(x, y)
    w0, b0 = solver.solve(ridge=0.0)
    assert _rel_err(w0, b0, *_np_lstsq(x, y)) <= 1e-4
    # ridge is relative to trace(Cxx) / d_in; the bias is not penalized
    r = 0.5
    w, b = solver.solve(ridge=r)
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    cxx = xc.t() @ xc
    lam = r * cxx.trace() / 5
    w_ref = torch.linalg.solve(cxx + lam * torch.eye(5, dtype=torch.float64), xc.t() @ yc).t()
    b_ref = y.double().mean(0) - w_ref @ x.double().mean(0)
    assert _rel_err(w, b, w_ref, b_ref) <= 1e-5
    with pytest.raises(ValueError, match="ridge"):
        solver.solve(ridge=-1.0)


def test_huge_and_tiny_scales_stay_finite():
    g = _gen(12)
    for scale in (1e-20, 1e15):
        x = torch.randn(50, 8, generator=g) * scale
        x = torch.cat([x, x[:, :2]], 1)
        y = torch.randn(50, 3, generator=g)
        w, b = esta_kernels.lstsq_init(x.double(), y.double())
        assert torch.isfinite(w).all() and torch.isfinite(b).all()
    w, b = esta_kernels.lstsq_init(torch.zeros(10, 4), torch.ones(10, 2))  # all-zero inputs
    assert torch.equal(w, torch.zeros(2, 4)) and torch.allclose(b, torch.ones(2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_in,scale_out", [(1e-25, 1.0), (1e-25, 1e25), (1e25, 1e-3), (1e-40, 1e-40)])
def test_extreme_magnitudes_are_exact_or_raise(backend, scale_in, scale_out):
    """Inputs whose float32 squares would underflow (1e-25: every product rounds to zero) or overflow are
    scaled by powers of two before the products; a solution beyond float32 raises OverflowError from
    solve() and is returned in float64 by solve_float64()."""
    g = _gen(31)
    x = (torch.randn(300, 6, generator=g, dtype=torch.float64) * scale_in).float()
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = ((x.double() / scale_in) @ w.T * scale_out + 0.01 * scale_out).float()
    # numpy's rank cut-off is relative to the ones column, so its oracle runs on the rescaled problem
    w_ref, b_ref = _np_lstsq(x.double() / scale_in, y.double() / scale_out)
    w_ref, b_ref = w_ref * scale_out / scale_in, b_ref * scale_out
    solver = esta_kernels.StreamingLstsq(6, 3, backend=backend).update(x, y)
    w64, b64 = solver.solve_float64()
    assert _rel_err(w64, b64, w_ref, b_ref) <= 1e-5
    if abs(w_ref).max() > 3e38:
        with pytest.raises(OverflowError, match="beyond float32's range.*solve_float64"):
            solver.solve()
    else:
        w32, b32 = solver.solve()
        assert torch.isfinite(w32).all() and _rel_err(w32, b32, w_ref, b_ref) <= 1e-5


def test_rcond_is_validated():
    solver = esta_kernels.StreamingLstsq(4, 2).update(torch.randn(20, 4), torch.randn(20, 2))
    for bad in (-1e-3, float("nan"), 1.0, float("inf")):
        with pytest.raises(ValueError, match="rcond must be a float in \\[0, 1\\)"):
            solver.solve(rcond=bad)
    for bad in ("1e-6", True):
        with pytest.raises(TypeError, match="rcond must be a float"):
            solver.solve(rcond=bad)
    w, _ = solver.solve(rcond=0.0)
    assert torch.isfinite(w).all()


# ----------------------------------------------------------------------------------- StitchingLayer
def test_stitching_layer_from_lstsq():
    x, y = _linear_data(600, 33, 19, seed=13, offset=1.0, lead=(3,))
    solver = esta_kernels.StreamingLstsq(33, 19).update(x, y)
    layer = StitchingLayer.from_lstsq(solver, num_stitches=4)
    assert isinstance(layer, StitchedLinear)
    assert layer.rank == 33 // 4 and layer.lora_alpha == float(layer.rank)
    assert layer.stitch_bias.shape == (4, 19) and torch.count_nonzero(layer.stitch_bias) == 0
    assert torch.count_nonzero(layer.lora_b) == 0
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_a.requires_grad and layer.stitch_bias.requires_grad
    w, b = solver.solve()
    assert torch.equal(layer.weight, w) and torch.equal(layer.bias, b)
    with torch.no_grad():
        for stitch in (None, 2):
            layer.stitch_ids = stitch
            torch.testing.assert_close(layer(x), x @ w.t() + b, rtol=1e-5, atol=1e-5)
    # the prediction is numpy's least-squares prediction
    w_ref, b_ref = _np_lstsq(x, y)
    pred_ref = x.double().numpy() @ w_ref.T + b_ref
    with torch.no_grad():
        np.testing.assert_allclose(layer(x).double().numpy(), pred_ref, rtol=0, atol=1e-4 * np.abs(pred_ref).max())

    small = StitchingLayer.from_lstsq(solver, num_stitches=0, rank=2, lora_alpha=4.0, ridge=0.0, dtype=torch.float64)
    assert small.rank == 2 and small.scale == 2.0 and small.stitch_bias is None
    assert small.weight.dtype == torch.float64 and small.lora_a.dtype == torch.float64
    tiny = StitchingLayer.from_lstsq(esta_kernels.StreamingLstsq(3, 5, bias=False).update(x[0, :, :3], y[0, :, :5]),
                                     num_stitches=1)
    assert tiny.rank == 1 and tiny.bias is None


def test_stitching_layer_from_multi_and_identity():
    x, y1 = _linear_data(300, 12, 7, seed=14)
    _, y2 = _linear_data(300, 12, 5, seed=15)
    multi = esta_kernels.StreamingLstsq.multi(12, [7, 5]).update(x, [y1, y2])
    layer = StitchingLayer.from_lstsq(multi, target=1, num_stitches=2)
    assert layer.out_features == 5 and torch.equal(layer.weight, multi.solve(1)[0])
    with pytest.raises(ValueError, match="target"):
        StitchingLayer.from_lstsq(multi, num_stitches=2)
    with pytest.raises(TypeError, match="StreamingLstsq"):
        StitchingLayer.from_lstsq(object(), num_stitches=2)
    ident = StitchingLayer.identity(4, 6, num_stitches=1)
    with torch.no_grad():
        out = ident(x[:, :4])
    torch.testing.assert_close(out, torch.cat([x[:, :4], torch.zeros(300, 2)], 1))


# --------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    s = esta_kernels.StreamingLstsq(5, 7)
    with pytest.raises(RuntimeError, match="no tokens accumulated"):
        s.solve()
    with pytest.raises(ValueError, match=r"update 1: h_in must have shape \(\.\.\., 5\)"):
        s.update(torch.randn(10, 6), torch.randn(10, 7))
    with pytest.raises(ValueError, match=r"update 2: h_out must have shape \(\.\.\., 7\)"):
        s.update(torch.randn(10, 5), torch.randn(10, 8))
    with pytest.raises(ValueError, match="update 3: h_in and h_out must hold the same number of rows"):
        s.update(torch.randn(10, 5), torch.randn(9, 7))
    with pytest.raises(TypeError, match="update 4: h_in must be float32, float16, bfloat16 or float64"):
        s.update(torch.ones(10, 5, dtype=torch.int64), torch.randn(10, 7))
    with pytest.raises(TypeError, match="h_out must be a torch.Tensor"):
        s.update(torch.randn(10, 5), [[1.0] * 7])
    s.update(torch.zeros(0, 5), torch.zeros(0, 7))  # no tokens: still nothing to solve
    with pytest.raises(RuntimeError, match="no tokens accumulated"):
        s.solve()
    x, y = torch.randn(20, 5), torch.randn(20, 7)
    s.update(x, y)
    before = (s.stats.sxx.clone(), s.stats.sxy.clone(), s.num_tokens)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="update 8: h_in contains NaN or inf"):
        s.update(bad, y)
    bad_y = y.clone()
    bad_y[0, 0] = float("inf")
    with pytest.raises(ValueError, match="update 9: h_out contains NaN or inf"):
        s.update(x, bad_y)
    assert torch.equal(s.stats.sxx, before[0]) and torch.equal(s.stats.sxy, before[1]) and s.num_tokens == before[2]
    fresh = esta_kernels.StreamingLstsq(5, 7)
    with pytest.raises(ValueError, match="update 1: h_in contains NaN or inf"):
        fresh.update(bad, y)
    assert fresh.stats is None  # a failed first update leaves no state
    # devices: the meta device stands in for another device
    on_cpu = esta_kernels.StreamingLstsq(5, 7, device="cpu")
    with pytest.raises(ValueError, match="state is on cpu"):
        on_cpu.update(torch.randn(4, 5, device="meta"), torch.randn(4, 7, device="meta"))
    with pytest.raises(ValueError, match="h_in is on cpu but h_out on meta"):
        on_cpu.update(torch.randn(4, 5), torch.randn(4, 7, device="meta"))
    # constructor arguments
    with pytest.raises(ValueError, match="in_features must be at least 1"):
        esta_kernels.StreamingLstsq(0, 7)
    with pytest.raises(TypeError, match="out_features must be an int"):
        esta_kernels.StreamingLstsq(5, 7.0)
    with pytest.raises(ValueError, match="backend"):
        esta_kernels.StreamingLstsq(5, 7, backend="gpu")
    with pytest.raises(ValueError, match="expected 2 targets"):
        esta_kernels.StreamingLstsq.multi(5, [7, 3]).update(x, [y])
    with pytest.raises(IndexError, match="target 2"):
        esta_kernels.StreamingLstsq.multi(5, [7, 3]).update(x, [y, y[:, :3]]).solve(2)


@pytest.mark.parametrize("backend", OP_BACKENDS + [pytest.param("torch", id="torch")])
def test_accumulate_bad_arguments(backend):
    x, y, s_in, s_out = torch.randn(6, 5), torch.randn(6, 7), torch.zeros(5), torch.zeros(7)
    with pytest.raises(ValueError, match="same number of rows"):
        lstsq_accumulate(x, y[:5], s_in, s_out, backend=backend)
    with pytest.raises(ValueError, match="h_in must be 2-D"):
        lstsq_accumulate(x[None], y, s_in, s_out, backend=backend)
    with pytest.raises(ValueError, match="shift_in must have shape"):
        lstsq_accumulate(x, y, s_out, s_out, backend=backend)
    with pytest.raises(ValueError, match="shift_out must have shape"):
        lstsq_accumulate(x, y, s_in, s_in, backend=backend)
    with pytest.raises(ValueError, match="h_out must have at least one feature"):
        lstsq_accumulate(x, y[:, :0], s_in, s_out[:0], backend=backend)
    with pytest.raises(TypeError, match="h_in must be float32"):
        lstsq_accumulate(x.int(), y, s_in, s_out, backend=backend)
    with pytest.raises(TypeError, match="shift_out must be float32"):
        lstsq_accumulate(x, y, s_in, s_out.half(), backend=backend)
    with pytest.raises(ValueError, match="one device"):
        lstsq_accumulate(x, y, s_in, s_out.to("meta"), backend=backend)


@pytest.mark.skipif("cpu" not in AVAILABLE or not _lstsq_ops.has_cpu_kernel(), reason="needs the C++ extension")
def test_cpu_kernel_checks_its_arguments():
    """The C++ kernel validates on its own (called through torch.ops, past the Python checks)."""
    op = torch.ops.esta.lstsq_accumulate
    x, y, s_in, s_out = torch.randn(6, 5), torch.randn(6, 7), torch.zeros(5), torch.zeros(7)
    with pytest.raises(ValueError, match="h_in and h_out must have the same number of rows"):
        op(x, y[:5], s_in, s_out)
    with pytest.raises(ValueError, match="shift_in must have shape"):
        op(x, y, s_out, s_out)
    with pytest.raises(TypeError, match="h_out must be float32"):
        op(x, y.int(), s_in, s_out)
    with pytest.raises(TypeError, match="shift_in must be float32"):
        op(x, y, s_in.half(), s_out)
    with pytest.raises(ValueError, match="h_in must be 2-D"):
        op(x[None], y, s_in, s_out)


@pytest.mark.skipif(not any(p.values[0] == "triton" for p in BACKENDS), reason="no triton backend here")
@pytest.mark.interpreter
def test_triton_backend_rejects_float64():
    h = torch.randn(8, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="the triton backend does not take float64 h_in"):
        esta_kernels.lstsq_accumulate(h, h, torch.zeros(5), torch.zeros(5), backend="triton")
