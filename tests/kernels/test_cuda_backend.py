"""The `cuda` backend (CUTLASS kernels in csrc/cuda/) on a GPU, against the float64 torch reference.

All tests carry the `gpu` marker (bench/gpu_check.sh runs them) and skip without a GPU or without the CUDA
kernels. The shared backend tests (opcheck, CUDA graphs, torch.compile, misaligned views, determinism) are
the cuda cases of test_stitched_linear.py; this file holds the cuda backend's own matrix and checks: ranks 1
to 256, odd row counts, every dtype and id mode, forward and backward; which kernel family ran; the no-sync id check.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import esta_kernels
from esta_kernels import _ext, _ops
from tests.helpers.inputs import grads_of, make_inputs, reference, reference_grads

HAS_CUDA_KERNELS = _ext.has_cuda_kernels()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="esta_kernels._C was built without its CUDA kernels"),
]

DTYPES = [pytest.param(d, id=n) for d, n in ((torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16"))]
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# K and N multiples of 8 but not of the tiles (64, 128): the tensor-core paths with partial tiles everywhere
K_ALIGNED, N_ALIGNED = 264, 392


def _naive(fn_inputs, scale):
    d = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in fn_inputs.items()}
    return esta_kernels.naive_stitched_linear(**d, scale=scale)


def _assert_close(out, ref, dtype, lowp_err, what):
    """float32: 5e-5 absolute + relative, scaled by the magnitude for the reductions over many rows;
    float16/bfloat16: 3x PyTorch's own low-precision error plus a few roundings of the largest value."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: unwritten or non-finite elements"
    err = (out.double() - ref).abs()
    big = ref.abs().max().item() if ref.numel() else 0.0
    bound = (5e-5 * (1 + big) + 5e-5 * ref.abs()) if dtype == torch.float32 else 3 * lowp_err + 4 * EPS[dtype] * (1 + big)
    worst = (err - bound).max().item() if err.numel() else -1
    assert worst <= 0, f"{what}: max error {err.max().item():.3g}, torch's own {dtype} error {lowp_err:.3g}"


def _path_counts():
    """Launches so far of the [Hopper, Ampere-class, SIMT] GEMM kernels."""
    return list(torch.ops.esta._cuda_gemm_path_counts())[:3]


def _built_with_sm90a():
    return bool(torch.ops.esta._cuda_gemm_path_counts()[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 2, 3, 8, 16, 256])
@pytest.mark.parametrize("M", [1, 7, 130, 4099])
@pytest.mark.parametrize("ids", ["none", "int", "rows"])
def test_forward_and_backward_matrix(dtype, r, M, ids, poison_empty):
    scale = 0.5
    inp = make_inputs(M, K_ALIGNED, N_ALIGNED, r, 5, dtype=dtype, device="cuda", ids=ids,
                      param_dtype=torch.float32, requires_grad=True)
    y = esta_kernels.stitched_linear(**inp, scale=scale, backend="cuda")
    ref = reference(inp, scale)
    lowp = 0.0 if dtype == torch.float32 else (_naive(inp, scale).double() - ref).abs().max().item()
    _assert_close(y, ref, dtype, lowp, "y")

    grad_y = torch.randn(M, N_ALIGNED, dtype=torch.float64, device="cuda").to(dtype)
    y.backward(grad_y)
    ref_g = reference_grads(inp, scale, grad_y)
    naive_g = {} if dtype == torch.float32 else grads_of(esta_kernels.naive_stitched_linear, inp, scale, grad_y,
                                                         lambda t: t.clone())
    for name, g_ref in ref_g.items():
        g = inp[name].grad
        if g_ref is None:  # stitch_bias without ids: unused by the reference, a zero gradient here
            assert g is None or not g.any(), f"d {name} should be zero"
            continue
        assert g is not None and g.dtype == inp[name].dtype and g.shape == inp[name].shape, name
        lowp_g = 0.0 if dtype == torch.float32 else (naive_g[name].double() - g_ref).abs().max().item()
        _assert_close(g, g_ref, dtype, lowp_g, f"d {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_tensor_core_kernels_run_where_expected(dtype):
    """Aligned 16-bit shapes run the Hopper TMA/wgmma kernels on an sm_90 GPU built with sm_90a (forward and
    dx), the Ampere-class kernels elsewhere; float32 and unaligned shapes the SIMT kernel."""
    cap = torch.cuda.get_device_capability()
    inp = make_inputs(300, K_ALIGNED, N_ALIGNED, 16, 4, dtype=dtype, device="cuda", ids="rows",
                      param_dtype=torch.float32, requires_grad=True)
    before = _path_counts()
    esta_kernels.stitched_linear(**inp, scale=1.0, backend="cuda").float().sum().backward()
    torch.cuda.synchronize()
    after = _path_counts()
    sm90, sm80, simt = (a - b for a, b in zip(after, before))
    if cap == (9, 0):
        assert _built_with_sm90a(), "an sm_90 GPU, but the extension has no sm_90a kernels: TORCH_CUDA_ARCH_LIST lacked 9.0"
        assert sm90 == 2, f"forward and dx should run the Hopper kernels, counts {after} (before {before})"
    else:
        assert sm90 == 0
    assert simt == 0, f"no aligned 16-bit GEMM should fall back to SIMT, counts {after} (before {before})"
    assert sm80 >= 4, "the down-projection, g and the two split reductions run on the Ampere-class kernel"

    odd = make_inputs(30, 37, 45, 3, 4, dtype=dtype, device="cuda", ids="rows")
    before = _path_counts()
    esta_kernels.stitched_linear(**odd, backend="cuda")
    assert _path_counts()[2] > before[2], "unaligned shapes take the SIMT kernel"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_long_reduction_and_second_segment_tiles(dtype):
    """K over many TMA tiles and a rank over several: the producer switches descriptors after the last K
    tile of x and W, and both segments' tails are zero-filled."""
    inp = make_inputs(257, 1000, 136, 200, 3, dtype=dtype, device="cuda", ids="rows", param_dtype=dtype)
    ref = reference(inp, 0.25)
    out = esta_kernels.stitched_linear(**inp, scale=0.25, backend="cuda")
    lowp = (_naive(inp, 0.25).double() - ref).abs().max().item()
    _assert_close(out, ref, dtype, lowp, "y")


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_lora_no_bias_and_empty_stitch_table(dtype):
    inp = make_inputs(65, K_ALIGNED, N_ALIGNED, 4, 3, dtype=dtype, device="cuda", ids="rows", lora=False,
                      bias=False)
    ref = reference(inp, 1.0)
    out = esta_kernels.stitched_linear(**inp, backend="cuda")
    lowp = 0.0 if dtype == torch.float32 else (_naive(inp, 1.0).double() - ref).abs().max().item()
    _assert_close(out, ref, dtype, lowp, "y")
    # S = 0 stitch-bias rows and every id -1: nothing is added, nothing is an error
    x, w = inp["x"], inp["weight"]
    empty = torch.zeros(0, N_ALIGNED, device="cuda", dtype=dtype)
    y, _ = _ops.FORWARD_OPS["cuda"](x, w, None, None, None, empty, torch.full((65,), -1, device="cuda"), 1.0)
    torch.testing.assert_close(y.double(), (x.double() @ w.double().T), atol=1e-2, rtol=1e-2)


_BAD_ID_SCRIPT = textwrap.dedent("""
    import sys, torch, esta_kernels
    from esta_kernels import _ops
    M, K, N = 40, {K}, {N}
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    sb = torch.randn(5, N, device="cuda")
    ids = torch.randint(-1, 5, (M,), device="cuda")
    ids[17] = {bad}
    y, _ = _ops.FORWARD_OPS["cuda"](x, w, None, None, None, sb, ids, 1.0)   # returns at once: no host sync
    print("launched", flush=True)
    torch.cuda.synchronize()   # the device-side assertion surfaces here
    print("not reported", flush=True)
""")


@pytest.mark.parametrize("bad", [-2, 2**40])  # each child process costs a CUDA start-up: two cases
def test_bad_device_ids_assert_on_the_device_without_a_sync(bad):
    """A bad id in a device tensor is never used as an address; the op returns without waiting for the GPU,
    and the device-side assertion names the id. It ends the CUDA context, so it runs in a child process."""
    script = _BAD_ID_SCRIPT.format(K=K_ALIGNED, N=N_ALIGNED, bad=bad)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    out = done.stdout + done.stderr
    assert "launched" in done.stdout, out[-2000:]
    assert done.returncode != 0 and "not reported" not in done.stdout, out[-2000:]
    assert f"stitch id {bad} is outside [-1, 5)" in out, out[-2000:]


def test_good_ids_do_not_sync_or_assert():
    """The per-call id check costs launches, not a host sync: a forward with device ids can be captured in
    a CUDA graph (a sync there would raise), and replays with other valid ids."""
    inp = make_inputs(64, K_ALIGNED, N_ALIGNED, 8, 5, dtype=torch.bfloat16, device="cuda", ids="rows")
    args = [inp[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "stitch_bias", "stitch_ids")]
    esta_kernels.stitched_linear(*args, backend="cuda")  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = esta_kernels.stitched_linear(*args, backend="cuda")
    inp["stitch_ids"].copy_(torch.randint(-1, 5, (64,), device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference(inp, 1.0)
    lowp = (_naive(inp, 1.0).double() - ref).abs().max().item()
    _assert_close(y, ref, torch.bfloat16, lowp, "y after replay")
