"""The GPU kernels of the least-squares accumulation against a float64 reference computed here:
triton_lstsq_accumulate (esta_kernels/triton/lstsq.py) under Triton's interpreter (marker `interpreter`,
CPU tensors, float32/float16/float64: the interpreter has no bfloat16) and on a GPU (marker `gpu`, with
bfloat16 and the ViT-S -> ViT-B shape), and the `cuda` backend (torch.ops.esta.lstsq_accumulate on CUDA
tensors; skipped unless esta_kernels._C has its CUDA kernels).

Error bound: u and v are rounded to float32 and the products of each block of <= 1024 rows are summed in
float32, so each entry's error is a small multiple of float32's unit roundoff times the sum over rows of
|ua_i| |c_j|, taken with the uncentred magnitudes (|h| + |shift|) because the shift is subtracted after the
rounding of the inputs' conversion.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is first imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from esta_kernels import _ext  # noqa: E402
from esta_kernels.triton import lstsq as tl_lstsq  # noqa: E402
from esta_kernels.triton.lstsq import triton_lstsq_accumulate  # noqa: E402
from tests.helpers.inputs import triton_test_marks  # noqa: E402

CUDA = torch.cuda.is_available()
interp, gpu_triton = triton_test_marks(tl_lstsq._lstsq_accumulate_kernel)
gpu_cuda = [pytest.mark.gpu,
            pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"),
            pytest.mark.skipif(not _ext.has_cuda_kernels(),
                               reason="esta_kernels._C was built without its CUDA kernels (ESTA_BUILD_CUDA=1)")]

UNIT = 2.0 ** -24  # float32 unit roundoff


# ---------------------------------------------------------------------------------------------- helpers
def _inputs(n, d_in, d_out, dtype, device, seed=0, mean=3.0):
    """Activations with a nonzero mean (what the shift removes) and shifts near, not at, that mean."""
    g = torch.Generator().manual_seed(seed)
    h_in = (torch.randn(n, d_in, generator=g, dtype=torch.float64) * 1.5 + mean).to(dtype)
    h_out = (torch.randn(n, d_out, generator=g, dtype=torch.float64) - mean).to(dtype)
    shift_in = (torch.full((d_in,), mean) + 0.1 * torch.randn(d_in, generator=g)).float()
    shift_out = (torch.full((d_out,), -mean) + 0.1 * torch.randn(d_out, generator=g)).float()
    return [t.to(device) for t in (h_in, h_out, shift_in, shift_out)]


def _reference(h_in, h_out, shift_in, shift_out):
    """(gram, cross, bound): the float64 results and an elementwise error bound for the kernels."""
    h_in, h_out = h_in.double().cpu(), h_out.double().cpu()
    s_in, s_out = shift_in.double().cpu(), shift_out.double().cpu()
    if s_in.dim() == 2:  # one shift row per block of 1024 rows
        block = torch.arange(h_in.shape[0]) // 1024
        s_in, s_out = s_in[block], s_out[block]
    ones = torch.ones(h_in.shape[0], 1, dtype=torch.float64)
    ua = torch.cat([h_in - s_in, ones], 1)
    v = h_out - s_out
    abs_ua = torch.cat([h_in.abs() + s_in.abs(), ones], 1)
    abs_v = h_out.abs() + s_out.abs()
    # 64 unit roundoffs: ~ sqrt(1024)-ish growth of the blocked float32 sums plus the input roundings
    return ua.T @ ua, ua.T @ v, 64 * UNIT * (abs_ua.T @ abs_ua), 64 * UNIT * (abs_ua.T @ abs_v)


def _check(gram, cross, h_in, h_out, shift_in, shift_out):
    n, d_in = h_in.shape
    d_out = h_out.shape[1]
    assert gram.dtype == torch.float64 and cross.dtype == torch.float64
    assert gram.shape == (d_in + 1, d_in + 1) and cross.shape == (d_in + 1, d_out)
    assert gram.device == h_in.device and cross.device == h_in.device
    gram, cross = gram.cpu(), cross.cpu()
    assert torch.isfinite(gram).all() and torch.isfinite(cross).all(), "unwritten or non-finite entries"
    assert torch.equal(gram, gram.T), "gram must be exactly symmetric"
    assert gram[-1, -1].item() == n, "the ones column must count the rows exactly"
    ref_g, ref_c, bound_g, bound_c = _reference(h_in, h_out, shift_in, shift_out)
    for name, out, ref, bound in (("gram", gram, ref_g, bound_g), ("cross", cross, ref_c, bound_c)):
        excess = ((out - ref).abs() - bound).max().item() if out.numel() else 0.0
        assert excess <= 0, f"{name}: max error {(out - ref).abs().max().item():.3g} over the bound"


# ----------------------------------------------------------------------------------------- interpreter
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interp, id="interp")])
@pytest.mark.parametrize("n", [0, 1, 37, 1100])
@pytest.mark.parametrize("d_in,d_out", [(5, 7), (33, 19)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_interpreter_matches_float64(device, n, d_in, d_out, dtype, poison_empty):
    args = _inputs(n, d_in, d_out, dtype, device, seed=n + d_in)
    gram, cross = triton_lstsq_accumulate(*args)
    _check(gram, cross, *args)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interp, id="interp"),
                                    pytest.param("cuda", marks=gpu_triton, id="gpu")])
@pytest.mark.parametrize("n", [1025, 2600])
def test_block_shifts(device, n):
    """2-D shifts: rows of block b (1024 rows) subtract row b; the splits and the interpreter's shorter
    float32 blocks both cross the shift blocks' edges."""
    g = torch.Generator().manual_seed(n)
    blocks = -(-n // 1024)
    offsets = torch.tensor([0.0, 500.0, -200.0][:blocks]).repeat_interleave(1024)[:n, None]
    h_in = (torch.randn(n, 6, generator=g) + offsets).to(device)
    h_out = (torch.randn(n, 5, generator=g) * 2 - offsets).to(device)
    s_in = torch.stack([h_in[i:i + 1024].mean(0) for i in range(0, n, 1024)]).float()
    s_out = torch.stack([h_out[i:i + 1024].mean(0) for i in range(0, n, 1024)]).float()
    gram, cross = triton_lstsq_accumulate(h_in, h_out, s_in, s_out)
    _check(gram, cross, h_in, h_out, s_in, s_out)
    assert gram[:6, :6].diagonal().max().item() < 2 * n  # centred per block (the offsets would give ~1e5 n)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interp, id="interp"),
                                    pytest.param("cuda", marks=gpu_triton, id="gpu")])
def test_float64_and_mixed_dtypes(device):
    # float64 inputs subtract the shift in float64; h_in and h_out may differ in dtype
    for dt_in, dt_out in ((torch.float64, torch.float64), (torch.float16, torch.float32),
                          (torch.float32, torch.float64)):
        h_in, _, s_in, _ = _inputs(300, 17, 9, dt_in, device, seed=1)
        _, h_out, _, s_out = _inputs(300, 17, 9, dt_out, device, seed=2)
        gram, cross = triton_lstsq_accumulate(h_in, h_out, s_in, s_out)
        _check(gram, cross, h_in, h_out, s_in, s_out)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interp, id="interp"),
                                    pytest.param("cuda", marks=gpu_triton, id="gpu")])
def test_strided_inputs(device):
    # a transposed h_in and a column slice of h_out: any strides, no copies needed
    h_in, h_out, s_in, s_out = _inputs(300, 21, 40, torch.float32, device, seed=3)
    h_in_t = h_in.T.contiguous().T
    h_out_s = h_out[:, 3:40:2]
    gram, cross = triton_lstsq_accumulate(h_in_t, h_out_s, s_in, s_out[3:40:2])
    _check(gram, cross, h_in_t, h_out_s, s_in, s_out[3:40:2])


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interp, id="interp"),
                                    pytest.param("cuda", marks=gpu_triton, id="gpu")])
def test_ones_column_sums(device):
    # gram[:d_in, -1] and cross[-1] are the column sums of u and v; gram[-1, -1] is n
    h_in, h_out, s_in, s_out = _inputs(600, 6, 3, torch.float32, device, seed=4)
    gram, cross = triton_lstsq_accumulate(h_in, h_out, s_in, s_out)
    u = h_in.double().cpu() - s_in.double().cpu()
    v = h_out.double().cpu() - s_out.double().cpu()
    torch.testing.assert_close(gram[:-1, -1].cpu(), u.sum(0), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(cross[-1].cpu(), v.sum(0), rtol=1e-5, atol=1e-3)
    assert gram[-1, -1].item() == 600


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interp, id="interp"),
                                    pytest.param("cuda", marks=gpu_triton, id="gpu")])
def test_bad_arguments(device):
    h_in, h_out, s_in, s_out = _inputs(8, 4, 3, torch.float32, device)
    f = triton_lstsq_accumulate
    with pytest.raises(ValueError, match="h_in"):
        f(h_in[0], h_out, s_in, s_out)
    with pytest.raises(ValueError, match="h_out"):
        f(h_in, h_out[:5], s_in, s_out)
    with pytest.raises(ValueError, match="shift_in"):
        f(h_in, h_out, s_in[:3], s_out)
    with pytest.raises(ValueError, match="shift_out"):
        f(h_in, h_out, s_in, s_out[None].expand(2, 3))  # 8 rows are one block: one shift row
    with pytest.raises(ValueError, match="h_in"):
        f(h_in[:, :0], h_out, s_in[:0], s_out)
    with pytest.raises(TypeError, match="h_in"):
        f(h_in.int(), h_out, s_in, s_out)
    with pytest.raises(TypeError, match="shift_out"):
        f(h_in, h_out, s_in, s_out.half())
    with pytest.raises(TypeError, match="h_out"):
        f(h_in, None, s_in, s_out)
    if device == "cpu":
        with pytest.raises(ValueError, match="device"):
            f(h_in, h_out.to("meta"), s_in, s_out)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=interp, id="interp"),
                                    pytest.param("cuda", marks=gpu_triton, id="gpu")])
def test_deterministic(device):
    args = _inputs(1100 if device == "cpu" else 19700, 33, 19, torch.float32, device, seed=5)
    first = triton_lstsq_accumulate(*args)
    second = triton_lstsq_accumulate(*args)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ------------------------------------------------------------------------------------------------ GPU
GPU_SHAPES = [(1, 5, 7), (37, 33, 19), (1100, 65, 130), (5000, 192, 384), (19700, 384, 768)]
GPU_DTYPES = [pytest.param(d, id=i) for d, i in
              ((torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16"))]


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("n,d_in,d_out", GPU_SHAPES)
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=gpu_triton), pytest.param("cuda", marks=gpu_cuda)])
def test_gpu_matches_float64(backend, n, d_in, d_out, dtype, poison_empty):
    args = _inputs(n, d_in, d_out, dtype, "cuda", seed=n)
    if backend == "triton":
        gram, cross = triton_lstsq_accumulate(*args)
    else:
        gram, cross = torch.ops.esta.lstsq_accumulate(*args)
    _check(gram, cross, *args)


@pytest.mark.parametrize("dtype", GPU_DTYPES + [pytest.param(torch.float64, id="f64")])
@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=gpu_cuda)])
def test_cuda_backend_dtypes_and_strides(backend, dtype):
    h_in, h_out, s_in, s_out = _inputs(2100, 70, 50, dtype, "cuda", seed=6)
    # strided views and a mixed pair (the host converts it to a common dtype)
    h_in_t = h_in.T.contiguous().T
    h_out_s = h_out[:, 1::2]
    gram, cross = torch.ops.esta.lstsq_accumulate(h_in_t, h_out_s, s_in, s_out[1::2].contiguous())
    _check(gram, cross, h_in_t, h_out_s, s_in, s_out[1::2])
    h_mixed = h_out.float()
    gram, cross = torch.ops.esta.lstsq_accumulate(h_in, h_mixed, s_in, s_out)
    _check(gram, cross, h_in, h_mixed, s_in, s_out)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=gpu_triton), pytest.param("cuda", marks=gpu_cuda)])
def test_gpu_deterministic_and_empty(backend):
    f = triton_lstsq_accumulate if backend == "triton" else torch.ops.esta.lstsq_accumulate
    args = _inputs(19700, 384, 768, torch.bfloat16, "cuda", seed=7)
    first, second = f(*args), f(*args)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    gram, cross = f(args[0][:0], args[1][:0], args[2], args[3])
    assert gram.shape == (385, 385) and cross.shape == (385, 768)
    assert not gram.any() and not cross.any()


@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=gpu_cuda)])
def test_cuda_backend_bad_arguments(backend):
    h_in, h_out, s_in, s_out = _inputs(8, 4, 3, torch.float32, "cuda")
    f = torch.ops.esta.lstsq_accumulate
    with pytest.raises(ValueError, match="h_out"):
        f(h_in, h_out[:5], s_in, s_out)
    with pytest.raises(ValueError, match="shift_in"):
        f(h_in, h_out, s_in[:3], s_out)
    with pytest.raises(TypeError, match="h_in"):
        f(h_in.int(), h_out, s_in, s_out)
