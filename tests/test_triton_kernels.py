"""The Triton entry points (esta_kernels/triton/stitched_linear.py) against the float64 torch reference.

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

import esta_kernels  # noqa: E402
from _inputs import lowp_error, make_inputs, reference, reference_grads  # noqa: E402
from esta_kernels.triton import stitched_linear as sl  # noqa: E402
from esta_kernels.triton.stitched_linear import (  # noqa: E402
    triton_stitched_linear_backward,
    triton_stitched_linear_forward,
)
from _inputs import triton_test_marks  # noqa: E402

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
    """Relative error of a float32 dot with float32 operands: TF32 on a GPU for 16-bit activations (and
    for float32 ones only where torch allows TF32); exact float32 in the interpreter."""
    if device == "cuda" and (dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32):
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
    acc_rel = 8 * _tf32_slack(dtype, device)
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
@pytest.mark.parametrize("r", [1, 16])
def test_matches_reference(device, dtype, M, r, poison_empty):
    inp = make_inputs(M, 37, 45, r, 5, dtype=dtype, device=device, ids="rows")
    if M:
        inp["stitch_ids"][0] = -1  # ids mix -1 and valid rows
    grad_y = torch.randn(M, 45, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 0.75, grad_y)
    _check_all(inp, 0.75, grad_y, y, xa, grads, device, dtype)


@pytest.mark.parametrize("device,dtype", [CPU_F16, GPU_F16, GPU_BF16])
def test_float32_master_weights(device, dtype, poison_empty):
    """16-bit activations with float32 LoRA factors and stitch bias (what autocast training passes)."""
    inp = make_inputs(70, 37, 45, 16, 5, dtype=dtype, device=device, ids="rows", param_dtype=torch.float32)
    grad_y = torch.randn(70, 45, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 0.5, grad_y)
    _check_all(inp, 0.5, grad_y, y, xa, grads, device, dtype)


@pytest.mark.parametrize("device,dtype", [CPU_F32, GPU_F32])
def test_rank_and_stitch_tiles(device, dtype, poison_empty):
    """A rank and a stitch count above one tile (16 in the interpreter): the epilogue's loop over the rank,
    and more than one job per column tile in the reduction kernel."""
    inp = make_inputs(70, 37, 45, 20, 21, dtype=dtype, device=device, ids="rows")
    grad_y = torch.randn(70, 45, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 1.5, grad_y)
    _check_all(inp, 1.5, grad_y, y, xa, grads, device, dtype)


@pytest.mark.parametrize("device,dtype", [CPU_F32, GPU_F32])
@pytest.mark.parametrize("lora,bias,S", [(False, True, 5), (True, False, 5), (True, True, None),
                                         (False, False, None)])
def test_optional_parts(device, dtype, lora, bias, S, poison_empty):
    inp = make_inputs(33, 37, 45, 4, S, dtype=dtype, device=device, lora=lora, bias=bias,
                      ids="rows" if S else "none")
    grad_y = torch.randn(33, 45, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 2.0, grad_y)
    _check_all(inp, 2.0, grad_y, y, xa, grads, device, dtype)
    if not lora:
        assert grads[1].shape == (0,) and grads[2].shape == (0,)
    if S is None:
        assert grads[3].shape == (0, 45)


@pytest.mark.parametrize("device,dtype", [CPU_F32, GPU_F32])
@pytest.mark.parametrize("the_id", [3, -1])
def test_one_broadcast_id(device, dtype, the_id, poison_empty):
    """One id for every row (read with stride 0): d stitch_bias[id] is the column sum of dy."""
    inp = make_inputs(40, 37, 45, 4, 5, dtype=dtype, device=device, ids="none")
    inp["stitch_ids"] = the_id
    grad_y = torch.randn(40, 45, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 1.0, grad_y)
    _check_all(inp, 1.0, grad_y, y, xa, grads, device, dtype)
    ds = grads[3]
    expected = torch.zeros(5, 45, dtype=torch.float64)
    if the_id >= 0:
        expected[the_id] = grad_y.double().cpu().sum(0)
    torch.testing.assert_close(ds.double().cpu(), expected, atol=1e-4, rtol=1e-5)


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


@pytest.mark.parametrize("device,dtype", [CPU_F32, GPU_F32])
@pytest.mark.parametrize("mask", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, True), (False, False, False, True)])
def test_output_mask(device, dtype, mask, poison_empty):
    inp = make_inputs(30, 37, 45, 3, 4, dtype=dtype, device=device, ids="rows")
    grad_y = torch.randn(30, 45, dtype=dtype, device=device)
    _, _, grads = _run(inp, 0.5, grad_y, mask=mask)
    _, _, full = _run(inp, 0.5, grad_y)
    for want, g, f, empty_dtype in zip(mask, grads, full, (dtype, torch.float32, torch.float32, torch.float32)):
        if want:
            torch.testing.assert_close(g, f, atol=0, rtol=0)  # the same kernels ran: bitwise equal
        else:
            assert g.shape == (0,) and g.dtype == empty_dtype


@pytest.mark.parametrize("device,dtype", [CPU_F32, GPU_F32])
def test_edge_shapes(device, dtype, poison_empty):
    """N = 0 (the LoRA intermediate is still computed), K = 0, and stitch ids None with S > 0."""
    inp = make_inputs(9, 12, 0, 3, 4, dtype=dtype, device=device, ids="rows")
    grad_y = torch.randn(9, 0, dtype=dtype, device=device)
    y, xa, grads = _run(inp, 1.0, grad_y)
    assert y.shape == (9, 0)
    _check(xa, inp["x"].double() @ inp["lora_a"].double().t(), rel=1e-5 if device == "cpu" else 1e-2)
    assert grads[0].abs().sum() == 0 and grads[1].abs().sum() == 0 and grads[3].shape == (4, 0)

    inp = make_inputs(9, 1, 10, 3, 4, dtype=dtype, device=device, ids="rows")
    for name in ("x", "weight", "lora_a"):
        inp[name] = inp[name][:, :0]
    grad_y = torch.randn(9, 10, dtype=torch.float64).to(dtype).to(device)
    y, xa, grads = _run(inp, 1.0, grad_y)
    _check_all(inp, 1.0, grad_y, y, xa, grads, device, dtype)

    inp = make_inputs(9, 12, 10, 3, 4, dtype=dtype, device=device, ids="rows")
    x, w, b, a, bb, sb, _ = _op_args(inp)
    y, xa = triton_stitched_linear_forward(x, w, b, a, bb, sb, None, 1.0)
    _check(y, reference({**inp, "stitch_ids": None}, 1.0), rel=1e-4)
    ds = triton_stitched_linear_backward(torch.ones_like(y), x, w, a, bb, xa, None, 4, 1.0, [False] * 3 + [True])[3]
    assert ds.shape == (4, 10) and ds.abs().sum() == 0


@pytest.mark.parametrize("device,dtype", [CPU_F32, GPU_F32])
def test_backward_is_deterministic(device, dtype):
    """Split-M partials are summed in a fixed order: two runs agree bit for bit."""
    inp = make_inputs(300, 37, 45, 16, 5, dtype=dtype, device=device, ids="rows")
    grad_y = torch.randn(300, 45, dtype=dtype, device=device)
    _, _, g1 = _run(inp, 0.5, grad_y)
    _, _, g2 = _run(inp, 0.5, grad_y)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


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
    for name, g_ref in reference_grads(inp, 0.5, grad_y).items():
        g = inp[name].grad
        assert g is not None and g.dtype == inp[name].dtype, name
        lowp_g = lowp if name == "x" else 0.0
        _check(g, g_ref, rel=4 * EPS[g.dtype] + 32 * _tf32_slack(dtype, device), lowp_err=lowp_g, what=f"d {name}")


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
    """Under CUDA-graph capture the host id check (a device sync) is skipped; the kernels still run."""
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
