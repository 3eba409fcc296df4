"""The Triton entry points (esta_kernels/triton/stitched_linear.py) against the float64 torch reference.

Both GEMM paths run: the Hopper path (persistent kernel, tensor descriptors; in the interpreter with
ESTA_TRITON_ARCH=90, on a GPU only on sm_90) and the pointer kernel (float32, TMA-illegal strides such as
K = 37, other archs). Tests parametrized by `path` select it with ESTA_TRITON_ARCH and use shapes the
chosen path accepts; they check which path the plan took.

Two places run them: Triton's interpreter on CPU tensors (marker `interpreter`; tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU; float32 and float16, the interpreter has no bfloat16) and a GPU (marker
`gpu`; float32, float16, bfloat16; low-precision results judged against PyTorch's own error in that
dtype). Outputs are allocated by the launchers, so the `poison_empty` fixture makes torch.empty fill them
with NaN: an element a kernel forgets to write fails.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is first imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
tl = triton.language

import esta_kernels  # noqa: E402
from tests.helpers.inputs import grads_of, lowp_error, make_inputs, reference, reference_grads  # noqa: E402
from esta_kernels.triton import hopper_gemm  # noqa: E402
from esta_kernels.triton import stitched_linear as sl  # noqa: E402
from esta_kernels.triton.stitched_linear import (  # noqa: E402
    triton_stitched_linear_backward,
    triton_stitched_linear_forward,
)
from tests.helpers.inputs import triton_test_marks  # noqa: E402

CUDA = torch.cuda.is_available()
interp, gpu = triton_test_marks(sl._stitched_gemm_kernel)

# (device, dtype) pairs: the interpreter has no bfloat16
CPU_F32 = pytest.param("cpu", torch.float32, marks=interp, id="interp-f32")
CPU_F16 = pytest.param("cpu", torch.float16, marks=interp, id="interp-f16")
GPU_F32 = pytest.param("cuda", torch.float32, marks=gpu, id="gpu-f32")
GPU_F16 = pytest.param("cuda", torch.float16, marks=gpu, id="gpu-f16")
GPU_BF16 = pytest.param("cuda", torch.bfloat16, marks=gpu, id="gpu-bf16")
GPU_ALL = [GPU_F32, GPU_F16, GPU_BF16]
DEVICE_DTYPES = [CPU_F32, CPU_F16] + GPU_ALL
EPS = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


# ----------------------------------------------------------------------------------------------- paths
def _gpu_arch():
    if not CUDA:
        return None
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor


@pytest.fixture(params=["tma", "pointer"])
def path(request, monkeypatch):
    """The GEMM path under test, forced through ESTA_TRITON_ARCH (90: Hopper path, 80: pointer kernel)."""
    if request.param == "tma" and CUDA and _gpu_arch() != 90:
        pytest.skip("the Hopper path needs an sm_90 GPU")
    monkeypatch.setenv("ESTA_TRITON_ARCH", "90" if request.param == "tma" else "80")
    return request.param


def _kn(path, dtype):
    """(K, N) of the standard test shape: TMA-legal on the Hopper path, K = 37 (TMA-illegal) otherwise."""
    return (40, 48) if path == "tma" and dtype != torch.float32 else (37, 45)


def _expected_path(path, dtype):
    return "tma" if path == "tma" and dtype != torch.float32 else "pointer"


def _plan_path(inp, scale=1.0):
    x, w, b, a, bb, sb, ids = _op_args(inp)
    interp = not x.is_cuda
    return sl.plan_forward(x, w, b, a, bb, sb, ids, scale, arch=sl._arch(x.device, interp), interpreter=interp).path


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _no_autotuning(monkeypatch):
    """On a GPU, each new shape would benchmark every autotune config: the correctness tests run the first
    config of each list instead (test_gpu_larger_shapes turns autotuning back on)."""
    monkeypatch.setenv("ESTA_TRITON_AUTOTUNE", "0")


def _op_args(inp):
    """Public-API inputs -> the entry points' arguments: x 2-D, ids 1-D int64 (one element for one id)."""
    x = inp["x"].detach()
    ids = inp["stitch_ids"]
    if isinstance(ids, int):
        ids = torch.full((1,), ids, dtype=torch.int64, device=x.device)
    elif ids is not None:
        ids = ids.reshape(-1).to(torch.int64)
    if inp["stitch_bias"] is None:
        ids = None

    def d(t):
        return None if t is None else t.detach()

    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return (x2, d(inp["weight"]), d(inp["bias"]), d(inp["lora_a"]), d(inp["lora_b"]),
            d(inp["stitch_bias"]), ids)


def _run(inp, scale, grad_y, mask=(True, True, True, True)):
    x, w, b, a, bb, sb, ids = _op_args(inp)
    y, xa = triton_stitched_linear_forward(x, w, b, a, bb, sb, ids, scale)
    S = 0 if sb is None else sb.shape[0]
    grads = triton_stitched_linear_backward(grad_y, x, w, a, bb, xa, ids, S, scale, list(mask))
    return y, xa, grads


def _tf32_slack(dtype, device):
    """Relative error of a float32 dot with float32 operands: TF32 on a GPU only for float32 activations
    where torch allows TF32; exact float32 in the interpreter."""
    if device == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return 2.0 ** -10
    return 2.0 ** -20


def _lowp(inp, scale, ref, dtype):
    return lowp_error(inp, scale, ref) if dtype != torch.float32 and ref.numel() else 0.0


def _check(out, ref, *, rel, lowp_err=0.0, what="output"):
    """|out - ref| <= rel * (1 + max|ref|) + 3 * (PyTorch's own low-precision error)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: unwritten (NaN-poisoned) or non-finite elements"
    if not out.numel():
        return
    err = (out.double().cpu() - ref.cpu()).abs().max().item()
    bound = rel * (1 + ref.abs().max().item()) + 3 * lowp_err
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (torch's own low-precision error {lowp_err:.3g})"


def _check_all(inp, scale, grad_y, y, xa, grads, device, dtype):
    ref = reference(inp, scale)
    lowp = _lowp(inp, scale, ref, dtype)
    out_rel = 4 * EPS[dtype] + 8 * _tf32_slack(dtype, device)
    _check(y.reshape(ref.shape), ref, rel=out_rel, lowp_err=lowp, what="y")
    # 16-bit activations: every dot takes 16-bit operands, so float32 factors and intermediates are
    # rounded to the activation dtype once (as autocast does) before their products are summed in float32
    acc_rel = 8 * _tf32_slack(dtype, device) if dtype == torch.float32 else 4 * EPS[dtype]
    x, _, _, a, _, _, _ = _op_args(inp)
    if a is not None:
        _check(xa, x.double() @ a.double().t(), rel=acc_rel, what="lora_xa")
    else:
        assert xa.shape == (x.shape[0], 0) and xa.dtype == torch.float32
    ref_g = reference_grads(inp, scale, grad_y.reshape(ref.shape))
    dx, da, db, ds = grads
    _check(dx.reshape(ref_g["x"].shape), ref_g["x"], rel=out_rel + acc_rel, lowp_err=lowp, what="dx")
    assert dx.dtype == dtype
    for name, g in (("lora_a", da), ("lora_b", db), ("stitch_bias", ds)):
        if name in ref_g:
            assert g.dtype == torch.float32
            _check(g, ref_g[name], rel=acc_rel * 4, what=f"d {name}")


# ------------------------------------------------------------------------------------- forward + backward
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("M", [0, 1, 7, 130])
@pytest.mark.parametrize("r", [1, 3, 16])
def test_matches_reference(device, dtype, M, r, path, poison_empty):
    K, N = _kn(path, dtype)
    inp = make_inputs(M, K, N, r, 5, dtype=dtype, device=device, ids="rows")
    if M:
        inp["stitch_ids"][0] = -1  # ids mix -1 and valid rows
    grad_y = torch.randn(M, N, dtype=torch.float64).to(dtype).to(device)
    assert _plan_path(inp) == _expected_path(path, dtype)
    y, xa, grads = _run(inp, 0.75, grad_y)
    _check_all(inp, 0.75, grad_y, y, xa, grads, device, dtype)


@pytest.mark.parametrize("device,dtype", [CPU_F16, GPU_F16, GPU_BF16])
def test_float32_master_weights(device, dtype, path, poison_empty):
    """16-bit activations with float32 LoRA factors and stitch bias (what autocast training passes)."""
    K, N = _kn(path, dtype)
    inp = make_inputs(70, K, N, 16, 5, dtype=dtype, device=device, ids="rows", param_dtype=torch.float32)
    grad_y = torch.randn(70, N, dtype=torch.float64).to(dtype).to(device)
    assert _plan_path(inp) == _expected_path(path, dtype)
    y, xa, grads = _run(inp, 0.5, grad_y)
    _check_all(inp, 0.5, grad_y, y, xa, grads, device, dtype)


@pytest.mark.parametrize("device,dtype", [CPU_F32, CPU_F16, GPU_F32, GPU_F16])
def test_rank_and_stitch_tiles(device, dtype, path, poison_empty):
    """A rank and a stitch count above one tile (16 in the interpreter): the epilogue's loop over the rank,
    and more than one job per column tile in the reduction kernel."""
    K, N = _kn(path, dtype)
    inp = make_inputs(70, K, N, 20, 21, dtype=dtype, device=device, ids="rows")
    grad_y = torch.randn(70, N, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 1.5, grad_y)
    _check_all(inp, 1.5, grad_y, y, xa, grads, device, dtype)


@pytest.mark.parametrize("device,dtype", [CPU_F16, GPU_F16, GPU_BF16])
@pytest.mark.parametrize("r", [1, 16, 20])
def test_fused_xa_variant(device, dtype, r, monkeypatch, poison_empty):
    """ESTA_TRITON_XA=fused: the Hopper main kernel accumulates xa beside y (ranks up to 32) and the tiles
    of the first column block publish it; y, the saved xa and every gradient match the reference."""
    if device == "cuda" and _gpu_arch() != 90:
        pytest.skip("the Hopper path needs an sm_90 GPU")
    monkeypatch.setenv("ESTA_TRITON_ARCH", "90")
    monkeypatch.setenv("ESTA_TRITON_XA", "fused")
    inp = make_inputs(70, 40, 104, r, 5, dtype=dtype, device=device, ids="rows", param_dtype=torch.float32)
    x, w, b, a, bb, sb, ids = _op_args(inp)
    plan = sl.plan_forward(x, w, b, a, bb, sb, ids, 0.5, arch=90, interpreter=device == "cpu", mode="fused")
    assert plan.path == "tma-fused-xa" and [name for name, _ in plan.launches] == ["y"]
    grad_y = torch.randn(70, 104, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 0.5, grad_y)
    _check_all(inp, 0.5, grad_y, y, xa, grads, device, dtype)


@triton.jit
def _g_job_coords_of(out_ptr, num_pid_m, num_pid_n, g_chunks, GROUP_M: tl.constexpr, BLOCK: tl.constexpr):
    """(is a g job, row block, column block or chunk) of every tile index of a G_JOBS launch, 3 int32s each."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    is_g, pm, px = hopper_gemm._g_job_coords(t, num_pid_m, num_pid_n, g_chunks, GROUP_M)
    total = num_pid_m * (num_pid_n + g_chunks)
    tl.store(out_ptr + 3 * t, is_g.to(tl.int32), mask=t < total)
    tl.store(out_ptr + 3 * t + 1, pm, mask=t < total)
    tl.store(out_ptr + 3 * t + 2, px, mask=t < total)


@pytest.mark.parametrize("device,dtype", [CPU_F16, GPU_F16, GPU_BF16])
@pytest.mark.parametrize("g_mode", ["fused", "thin"])
@pytest.mark.parametrize("M,r", [(1, 1), (7, 3), (130, 20), (130, 33), (200, 1)])
def test_g_in_dx_launch(device, dtype, g_mode, M, r, monkeypatch, poison_empty):
    """ESTA_TRITON_G: "fused" (default) runs g = scale * dy @ B as g jobs of the dx launch on the Hopper path
    (one launch reads dy for both), "thin" as a thin launch before dx. Ranks over several g chunks (the
    interpreter's chunk is 16 wide), M over several row-block groups with a short last one; dx and every
    gradient match the reference in both modes."""
    if device == "cuda" and _gpu_arch() != 90:
        pytest.skip("the Hopper path needs an sm_90 GPU")
    monkeypatch.setenv("ESTA_TRITON_ARCH", "90")
    monkeypatch.setenv("ESTA_TRITON_G", g_mode)
    inp = make_inputs(M, 40, 104, r, 5, dtype=dtype, device=device, ids="rows", param_dtype=torch.float32)
    x, w, b, a, bb, sb, ids = _op_args(inp)
    dy = torch.randn(M, 104, dtype=torch.float64).to(dtype).to(device)
    xa = torch.zeros(M, r, dtype=torch.float32, device=device)
    plan = sl.plan_backward(dy, x, w, a, bb, xa, ids, 5, 0.5, [True] * 4, arch=90,
                            interpreter=device == "cpu", mode=g_mode)
    names = [name for name, _ in plan.launches]
    if g_mode == "fused":
        assert plan.path == "tma-fused-g" and names == ["dx", "dlora_b+dstitch", "dlora_a"]
        assert plan.launches[0][1].meta["G_JOBS"]
    else:
        assert plan.path == "tma" and names == ["g", "dx", "dlora_b+dstitch", "dlora_a"]
    y, xa, grads = _run(inp, 0.5, dy)
    _check_all(inp, 0.5, dy, y, xa, grads, device, dtype)
    # g is needed without dx too (d lora_a alone): then a thin launch computes it in either mode
    plan = sl.plan_backward(dy, x, w, a, bb, xa, ids, 5, 0.5, [False, True, False, False], arch=90,
                            interpreter=device == "cpu", mode=g_mode)
    assert [name for name, _ in plan.launches] == ["g", "dlora_a"]
    da = triton_stitched_linear_backward(dy, x, w, a, bb, xa, ids, 5, 0.5, [False, True, False, False])[1]
    _check(da, reference_grads(inp, 0.5, dy)["lora_a"], rel=16 * EPS[dtype], what="d lora_a alone")


def test_g_job_schedule_orders_every_wait():
    """hopper_gemm._g_job_coords (run in the interpreter for every tile index): the linear tile order of a
    G_JOBS launch lists each g job and each output tile exactly once, and every output tile comes after
    all g jobs of its row block. Programs take tiles in increasing order and are all resident, so every
    wait ends (the argument in the kernel's docstring rests on this order)."""
    dev = "cuda" if CUDA else "cpu"
    for num_pid_m, num_pid_n, g_chunks, group_m in [(1, 1, 1, 8), (5, 3, 2, 2), (7, 4, 1, 3), (64, 16, 2, 8),
                                                    (25, 6, 3, 8), (3, 1, 4, 1)]:
        total = num_pid_m * (num_pid_n + g_chunks)
        out = torch.full((3 * total,), -1, dtype=torch.int32, device=dev)
        _g_job_coords_of[(triton.cdiv(total, 64),)](out, num_pid_m, num_pid_n, g_chunks, GROUP_M=group_m, BLOCK=64)
        rows = out.view(total, 3).tolist()
        where = f"num_pid_m={num_pid_m} num_pid_n={num_pid_n} g_chunks={g_chunks} GROUP_M={group_m}"
        g_jobs = {(m, c): t for t, (is_g, m, c) in enumerate(rows) if is_g}
        tiles = {(m, n): t for t, (is_g, m, n) in enumerate(rows) if not is_g}
        assert set(g_jobs) == {(m, c) for m in range(num_pid_m) for c in range(g_chunks)}, where
        assert set(tiles) == {(m, n) for m in range(num_pid_m) for n in range(num_pid_n)}, where
        assert len(g_jobs) + len(tiles) == total, where  # no index twice
        for (m, n), t in tiles.items():
            last_g = max(g_jobs[(m, c)] for c in range(g_chunks))
            assert last_g < t, f"{where}: tile ({m}, {n}) at {t} before its g job at {last_g}"


def test_g_jobs_configs():
    """The dx launch's configs: a g chunk is never wider than a dx tile (a g job then does at most a tile's
    main-loop work, the premise of the short waits), and no config warp-specializes or flattens the tile loop
    (two kinds of tile under one runtime branch); the autotuner keys on the rank (the g jobs' work grows
    with it)."""
    configs = sl.autotune_configs("tma", "hopper", "gjobs")
    assert configs
    for cfg in configs:
        assert sl.G_MAX_BLOCK <= cfg.kwargs["BLOCK_N"], cfg
        assert not cfg.kwargs["WARP_SPECIALIZE"] and not cfg.kwargs["FLATTEN"], cfg
    assert "R" in sl._AUTOTUNE_KEYS["tma"]


@pytest.mark.parametrize("device,dtype", [CPU_F16, GPU_F16, GPU_BF16])
def test_g_jobs_wait_and_fallback(device, dtype, monkeypatch, poison_empty):
    """The dx launch's tiles find their row block's g written by the g jobs (ready_ptr[0] stays 0: no tile
    computed g itself). In the interpreter the launch runs as one program; run as three (which the
    interpreter runs one after another, so tiles of the first find the g jobs of later ones missing) the
    tiles that find g missing compute it themselves and say so in ready_ptr[0], and dx is still right."""
    if device == "cuda" and _gpu_arch() != 90:
        pytest.skip("the Hopper path needs an sm_90 GPU")
    monkeypatch.setenv("ESTA_TRITON_ARCH", "90")
    inp = make_inputs(130, 40, 104, 20, 5, dtype=dtype, device=device, ids="rows", param_dtype=torch.float32)
    x, w, b, a, bb, sb, ids = _op_args(inp)
    dy = torch.randn(130, 104, dtype=torch.float64).to(dtype).to(device)
    ref_dx = reference_grads(inp, 0.5, dy)["x"]
    lowp = _lowp(inp, 0.5, reference(inp, 0.5), dtype)
    xa = torch.zeros(130, 20, device=device)
    orders = [None] if device == "cuda" else [None, 3]
    for num_sms in orders:
        plan = sl.plan_backward(dy, x, w, a, bb, xa, ids, 5, 0.5, [True, False, False, False], arch=90,
                                interpreter=device == "cpu")
        (name, launch), = plan.launches
        assert name == "dx" and launch.meta["G_JOBS"]
        if device == "cpu":
            assert launch.meta["NUM_SMS"] == 1 and launch.meta["MAX_POLLS"] == 0
        if num_sms:
            launch = launch._replace(meta={**launch.meta, "NUM_SMS": num_sms})
        sl._launch(launch, x.device)
        fell_back = int(launch.args["ready_ptr"][0])
        assert fell_back == (1 if num_sms else 0), f"NUM_SMS={num_sms}: ready_ptr[0] = {fell_back}"
        _check(plan.finish()[0], ref_dx, rel=8 * EPS[dtype], lowp_err=lowp, what=f"dx (NUM_SMS={num_sms})")


F32_F16 = [CPU_F32, CPU_F16, GPU_F32, GPU_F16]


@pytest.mark.parametrize("device,dtype", F32_F16)
@pytest.mark.parametrize("lora,bias,S", [(False, True, 5), (True, False, 5), (True, True, None),
                                         (False, False, None)])
def test_optional_parts(device, dtype, lora, bias, S, path, poison_empty):
    K, N = _kn(path, dtype)
    inp = make_inputs(33, K, N, 4, S, dtype=dtype, device=device, lora=lora, bias=bias,
                      ids="rows" if S else "none")
    grad_y = torch.randn(33, N, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 2.0, grad_y)
    _check_all(inp, 2.0, grad_y, y, xa, grads, device, dtype)
    if not lora:
        assert grads[1].shape == (0,) and grads[2].shape == (0,)
    if S is None:
        assert grads[3].shape == (0, N)


@pytest.mark.parametrize("device,dtype", F32_F16)
@pytest.mark.parametrize("the_id", [3, -1])
def test_one_broadcast_id(device, dtype, the_id, path, poison_empty):
    """One id for every row (read with stride 0): d stitch_bias[id] is the column sum of dy."""
    K, N = _kn(path, dtype)
    inp = make_inputs(40, K, N, 4, 5, dtype=dtype, device=device, ids="none")
    inp["stitch_ids"] = the_id
    grad_y = torch.randn(40, N, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 1.0, grad_y)
    _check_all(inp, 1.0, grad_y, y, xa, grads, device, dtype)
    ds = grads[3]
    expected = torch.zeros(5, N, dtype=torch.float64)
    if the_id >= 0:
        expected[the_id] = grad_y.double().cpu().sum(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # a 16-bit dy: one-hot dots of 16-bit operands
    torch.testing.assert_close(ds.double().cpu(), expected, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("device,dtype", [CPU_F32, GPU_F32])
def test_noncontiguous_inputs(device, dtype, poison_empty):
    M, K, N = 21, 24, 40
    inp = make_inputs(M, K, N, 4, 6, dtype=dtype, device=device, ids="rows")
    inp["x"] = torch.randn(2 * K, M, dtype=dtype, device=device).t()[:, ::2]  # (M, K), strides (1, 2M)
    inp["weight"] = (torch.randn(2 * N, K, dtype=dtype, device=device) * K ** -0.5)[::2]
    inp["lora_b"] = torch.randn(inp["lora_b"].shape[1], N, dtype=dtype, device=device).t()
    inp["stitch_ids"] = torch.randint(-1, 6, (2 * M,), device=device)[::2]
    assert not inp["x"].is_contiguous() and not inp["weight"].is_contiguous()
    grad_y = torch.randn(N, M, dtype=torch.float64).to(dtype).to(device).t()  # non-contiguous dy
    y, xa, grads = _run(inp, 0.5, grad_y)
    _check_all(inp, 0.5, grad_y, y, xa, grads, device, dtype)


@pytest.mark.parametrize("device,dtype", F32_F16)
@pytest.mark.parametrize("mask", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, True), (False, False, False, True)])
def test_output_mask(device, dtype, mask, path, poison_empty):
    K, N = _kn(path, dtype)
    inp = make_inputs(30, K, N, 3, 4, dtype=dtype, device=device, ids="rows")
    grad_y = torch.randn(30, N, dtype=dtype, device=device)
    _, _, grads = _run(inp, 0.5, grad_y, mask=mask)
    _, _, full = _run(inp, 0.5, grad_y)
    for want, g, f, empty_dtype in zip(mask, grads, full, (dtype, torch.float32, torch.float32, torch.float32)):
        if want:
            torch.testing.assert_close(g, f, atol=0, rtol=0)  # the same kernels ran: bitwise equal
        else:
            assert g.shape == (0,) and g.dtype == empty_dtype


@pytest.mark.parametrize("device,dtype", F32_F16)
def test_edge_shapes(device, dtype, path, poison_empty):
    """N = 0 (the LoRA intermediate is still computed), K = 0, and stitch ids None with S > 0."""
    inp = make_inputs(9, 12, 0, 3, 4, dtype=dtype, device=device, ids="rows")
    grad_y = torch.randn(9, 0, dtype=dtype, device=device)
    y, xa, grads = _run(inp, 1.0, grad_y)
    assert y.shape == (9, 0)
    _check(xa, inp["x"].double() @ inp["lora_a"].double().t(),
           rel=1e-5 if device == "cpu" and dtype == torch.float32 else 1e-2)
    assert grads[0].abs().sum() == 0 and grads[1].abs().sum() == 0 and grads[3].shape == (4, 0)

    inp = make_inputs(9, 1, 10, 3, 4, dtype=dtype, device=device, ids="rows")
    for name in ("x", "weight", "lora_a"):
        inp[name] = inp[name][:, :0]
    grad_y = torch.randn(9, 10, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 1.0, grad_y)
    _check_all(inp, 1.0, grad_y, y, xa, grads, device, dtype)

    inp = make_inputs(9, 16, 16, 3, 4, dtype=dtype, device=device, ids="rows")
    x, w, b, a, bb, sb, _ = _op_args(inp)
    y, xa = triton_stitched_linear_forward(x, w, b, a, bb, sb, None, 1.0)
    ref = reference({**inp, "stitch_ids": None}, 1.0)
    _check(y, ref, rel=4 * EPS[dtype] + 1e-4, lowp_err=_lowp({**inp, "stitch_ids": None}, 1.0, ref, dtype))
    ds = triton_stitched_linear_backward(torch.ones_like(y), x, w, a, bb, xa, None, 4, 1.0, [False] * 3 + [True])[3]
    assert ds.shape == (4, 16) and ds.abs().sum() == 0


@pytest.mark.parametrize("device,dtype", F32_F16)
def test_backward_is_deterministic(device, dtype, path):
    """Split-M partials are summed in a fixed order: two runs agree bit for bit."""
    K, N = _kn(path, dtype)
    inp = make_inputs(300, K, N, 16, 5, dtype=dtype, device=device, ids="rows")
    grad_y = torch.randn(300, N, dtype=dtype, device=device)
    _, _, g1 = _run(inp, 0.5, grad_y)
    _, _, g2 = _run(inp, 0.5, grad_y)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ dispatch
def test_tma_path_dispatch_rule():
    """sl.tma_path: the Hopper path only on sm_90 for 16-bit x and weight whose layout TMA can address."""
    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype)

    x, w = t(64, 64), t(96, 64)
    assert sl.tma_path(90, x, w, 96)
    assert sl.tma_path(90, x.half(), w.half(), 96)
    assert not sl.tma_path(80, x, w, 96)  # Ampere: no TMA
    assert not sl.tma_path(None, x, w, 96)  # the interpreter's default
    assert not sl.tma_path(100, x, w, 96)  # untuned arch: the pointer kernel
    assert not sl.tma_path(90, x.float(), w.float(), 96)  # float32 activations
    assert not sl.tma_path(90, x, w.half(), 96)  # mixed dtypes
    assert not sl.tma_path(90, t(64, 37), t(96, 37), 96)  # K = 37: 74-byte rows
    assert not sl.tma_path(90, x, w, 45)  # output rows of 90 bytes
    offset = t(64, 72)[:, 8:]  # rows of 144 bytes, base 16 bytes in: aligned when the storage is
    assert sl.tma_path(90, offset, w, 96) == (offset.data_ptr() % 16 == 0)
    assert not sl.tma_path(90, t(64, 65)[:, 1:], w, 96)  # base misaligned by 2 bytes
    assert not sl.tma_path(90, t(64, 128)[:, ::2], w, 96)  # non-unit last stride
    assert not sl.tma_path(90, t(64, 64).t(), t(96, 64), 96)  # column-major x
    assert not sl.tma_path(90, t(64, 0), t(96, 0), 96)  # K = 0: nothing to describe
    meta = torch.empty(8192, 4096, dtype=torch.bfloat16, device="meta")
    assert sl.tma_path(90, meta, meta, 4096)  # planning on meta tensors (inspect, compile tests)


@pytest.mark.parametrize("device,dtype", [CPU_F16, GPU_F16])
def test_misaligned_operands_fall_back(device, dtype, monkeypatch, poison_empty):
    """On sm_90, operands TMA cannot take run the pointer kernel, with the same results."""
    monkeypatch.setenv("ESTA_TRITON_ARCH", "90")
    if device == "cuda" and _gpu_arch() != 90:
        pytest.skip("needs an sm_90 GPU")
    inp = make_inputs(33, 40, 48, 4, 5, dtype=dtype, device=device, ids="rows")
    assert _plan_path(inp) == "tma"
    inp["x"] = torch.randn(33, 41, dtype=torch.float64).to(dtype).to(device)[:, 1:]  # rows start 2 bytes off
    assert _plan_path(inp) == "pointer"
    grad_y = torch.randn(33, 48, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 0.5, grad_y)
    _check_all(inp, 0.5, grad_y, y, xa, grads, device, dtype)


def test_16bit_launches_never_run_float32_dots():
    """No TF32 (or any float32 dot) for 16-bit activations at any rank, on either path: every planned
    launch is the Hopper kernel (16-bit operands only) or a pointer kernel in its 16-bit mode."""
    def mk(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    for arch in (90, 80):
        for r in (1, 16, 256):
            for pdt in (torch.bfloat16, torch.float32):
                x, w, dy = mk(4096, 512), mk(768, 512), mk(4096, 768)
                a, b, sb, ids = mk(r, 512, dtype=pdt), mk(768, r, dtype=pdt), mk(7, 768, dtype=pdt), \
                    mk(4096, dtype=torch.int64)
                fwd = sl.plan_forward(x, w, None, a, b, sb, ids, 2.0, arch=arch)
                bwd = sl.plan_backward(dy, x, w, a, b, fwd.xa, ids, 7, 2.0, [True] * 4, arch=arch)
                for name, launch in fwd.launches + bwd.launches:
                    where = f"sm_{arch} r={r} params {pdt}: {name}"
                    if launch.role.startswith("tma"):
                        assert arch == 90, where
                    else:
                        assert launch.meta["LOWP"], f"{where} plans a float32 dot"


# ----------------------------------------------------------------------------------- stitch ids, no sync
@pytest.mark.parametrize("device,dtype", [CPU_F32, CPU_F16])
@pytest.mark.parametrize("bad", [5, -2])
def test_device_side_id_flag(device, dtype, bad, path, monkeypatch):
    """Ids that live on a GPU are never read by the host: the kernels flag an id outside [-1, S) and the
    op queues torch._assert_async on the flag (on the CPU it raises at once; on a GPU it fails the stream
    later, without a sync). Simulated here by treating CPU ids as device ids."""
    K, N = _kn(path, dtype)
    inp = make_inputs(45, K, N, 3, 5, dtype=dtype, device=device, ids="rows")
    x, w, b, a, bb, sb, ids = _op_args(inp)
    bad_ids = ids.clone()
    bad_ids[37] = bad
    ref = reference({**inp, "stitch_ids": torch.where(bad_ids == bad, -1, bad_ids)}, 1.0)
    lowp = _lowp(inp, 1.0, reference(inp, 1.0), dtype)
    monkeypatch.setattr(sl, "ids_checked_on_host", lambda t: False)
    monkeypatch.setattr(sl, "check_ids_range", lambda *a: pytest.fail("the host read the ids"))
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: pytest.fail("the host reduced the ids"))
    y, xa = triton_stitched_linear_forward(x, w, b, a, bb, sb, ids, 1.0)  # good ids: no report
    dy = torch.randn(45, N, dtype=torch.float64).to(dtype)
    triton_stitched_linear_backward(dy, x, w, a, bb, xa, ids, 5, 1.0, [True] * 4)
    with pytest.raises(RuntimeError, match=r"stitch id is outside \[-1, 5\)"):
        triton_stitched_linear_forward(x, w, b, a, bb, sb, bad_ids, 1.0)
    with pytest.raises(RuntimeError, match=r"stitch id is outside \[-1, 5\)"):
        triton_stitched_linear_backward(dy, x, w, a, bb, xa, bad_ids, 5, 1.0, [False, False, False, True])
    # the flag itself, set by the kernel alone; the bad row got no stitch bias and no out-of-bounds read
    plan = sl.plan_forward(x, w, b, a, bb, sb, bad_ids, 1.0, arch=sl._arch(x.device, True), interpreter=True)
    for _, launch in plan.launches:
        sl._launch(launch, x.device)
    assert plan.flag.tolist() == [0]  # cleared: a bad id was seen
    # every row, the bad one included, is what id -1 (no stitch bias) gives
    _check(plan.y.double(), ref, rel=4 * EPS[dtype] + 1e-5, lowp_err=lowp)


def test_host_ids_are_checked_eagerly_and_once():
    """Ids in host memory: one range check on the host per call (no memo), IndexError before any launch."""
    calls = []
    real = sl.check_ids_range
    inp = make_inputs(9, 12, 10, 3, 5, ids="rows")
    x, w, b, a, bb, sb, ids = _op_args(inp)
    try:
        sl.check_ids_range = lambda t, s: calls.append(s) or real(t, s)
        triton_stitched_linear_forward(x, w, b, a, bb, sb, ids, 1.0)
        triton_stitched_linear_forward(x, w, b, a, bb, sb, ids, 1.0)
    finally:
        sl.check_ids_range = real
    assert calls == [5, 5]


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("device,dtype", [CPU_F32, GPU_F32])
@pytest.mark.parametrize("bad", [5, -2, 2 ** 40])
def test_out_of_range_ids_raise(device, dtype, bad):
    inp = make_inputs(9, 12, 10, 3, 5, dtype=dtype, device=device, ids="rows")
    x, w, b, a, bb, sb, ids = _op_args(inp)
    ids = ids.clone()
    ids[4] = bad
    with pytest.raises(IndexError, match=r"outside \[-1, 5\)"):
        triton_stitched_linear_forward(x, w, b, a, bb, sb, ids, 1.0)
    with pytest.raises(IndexError, match=r"outside \[-1, 5\)"):
        triton_stitched_linear_forward(x, w, b, a, bb, sb, torch.tensor([bad], device=device), 1.0)
    xa = torch.zeros(9, 3, device=device)
    with pytest.raises(IndexError, match=r"outside \[-1, 5\)"):
        triton_stitched_linear_backward(torch.ones(9, 10, dtype=dtype, device=device), x, w, a, bb, xa, ids, 5,
                                        1.0, [True] * 4)


@pytest.mark.parametrize("device,dtype", [CPU_F32, GPU_F32])
def test_bad_arguments_raise(device, dtype):
    inp = make_inputs(9, 12, 10, 3, 5, dtype=dtype, device=device, ids="rows")
    x, w, b, a, bb, sb, ids = _op_args(inp)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        triton_stitched_linear_forward(x.double(), w.double(), None, None, None, None, None, 1.0)
    with pytest.raises(ValueError, match="stitch_ids must be 1-D with M = 9 elements or 1 element"):
        triton_stitched_linear_forward(x, w, b, a, bb, sb, ids[:4], 1.0)
    with pytest.raises(TypeError, match="stitch_ids must be int64"):
        triton_stitched_linear_forward(x, w, b, a, bb, sb, ids.int(), 1.0)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        triton_stitched_linear_backward(torch.ones(9, 11, dtype=dtype, device=device), x, w, a, bb,
                                        torch.zeros(9, 3, device=device), ids, 5, 1.0, [True] * 4)


# ------------------------------------------------------------------------------ through the public API
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("ids", ["rows", "int"])
def test_public_api_autograd(device, dtype, ids, poison_empty):
    """esta_kernels.stitched_linear(..., backend="triton") forward and backward through autograd, with
    leading dimensions."""
    inp = make_inputs(None, 37, 45, 16, 5, dtype=dtype, device=device, ids=ids, lead=(3, 11),
                      param_dtype=torch.float32, requires_grad=True)
    grad_y = torch.randn(3, 11, 45, dtype=torch.float64).to(dtype).to(device)
    y = esta_kernels.stitched_linear(**inp, scale=0.5, backend="triton")
    ref = reference(inp, 0.5)
    lowp = _lowp(inp, 0.5, ref, dtype)
    _check(y, ref, rel=4 * EPS[dtype] + 8 * _tf32_slack(dtype, device), lowp_err=lowp, what="y")
    y.backward(grad_y)
    # 16-bit activations: gradients within PyTorch's own error for the unfused composition in that dtype
    naive = grads_of(esta_kernels.naive_stitched_linear, inp, 0.5, grad_y, lambda t: t.clone()) \
        if dtype != torch.float32 else {}
    for name, g_ref in reference_grads(inp, 0.5, grad_y).items():
        g = inp[name].grad
        assert g is not None and g.dtype == inp[name].dtype, name
        lowp_g = (naive[name].double().cpu() - g_ref.cpu()).abs().max().item() if name in naive else 0.0
        _check(g, g_ref, rel=4 * EPS[dtype] + 32 * _tf32_slack(dtype, device), lowp_err=lowp_g, what=f"d {name}")


# ------------------------------------------------------------------------------------------- GPU only
@pytest.mark.parametrize("device,dtype", GPU_ALL)
@pytest.mark.parametrize("M,K,N,r,S", [(1000, 256, 384, 16, 40), (4096, 1024, 1024, 96, 3)])
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
def test_gpu_larger_shapes(device, dtype, M, K, N, r, S, param_dtype, poison_empty, monkeypatch):
    """Shapes that run the autotuned configs and several split-M partials."""
    monkeypatch.setenv("ESTA_TRITON_AUTOTUNE", "1")
    pdt = torch.float32 if param_dtype == "float32" else dtype
    inp = make_inputs(M, K, N, r, S, dtype=dtype, device=device, ids="rows", param_dtype=pdt)
    grad_y = torch.randn(M, N, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 0.5, grad_y)
    _check_all(inp, 0.5, grad_y, y, xa, grads, device, dtype)


@pytest.mark.parametrize("device,dtype", [GPU_F16, GPU_BF16])
def test_gpu_cuda_graph_capture(device, dtype):
    """GPU ids are never read by the host, so forward (with its bad-id flag and torch._assert_async) captures
    into a CUDA graph and replays to the eager result."""
    inp = make_inputs(256, 128, 192, 16, 5, dtype=dtype, device=device, ids="rows")
    x, w, b, a, bb, sb, ids = _op_args(inp)
    y_eager, _ = triton_stitched_linear_forward(x, w, b, a, bb, sb, ids, 0.5)  # autotunes outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph, _ = triton_stitched_linear_forward(x, w, b, a, bb, sb, ids, 0.5)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y_graph, y_eager, atol=0, rtol=0)
