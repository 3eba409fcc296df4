"""torch.library registration: opcheck, torch.compile and autocast, on every backend testable here; the CUDA
kernels registered by a CUDA build (the GPU opcheck is in test_stitched_linear.py)."""
import os

import pytest
import torch

import esta_kernels
from tests.helpers.inputs import make_inputs, reference

AVAILABLE = esta_kernels.available_backends()
OPS = []
if "cpu" in AVAILABLE:
    OPS.append(pytest.param("cpu", id="cpu"))
if "triton" in AVAILABLE:
    OPS.append(pytest.param("triton", marks=pytest.mark.interpreter, id="triton"))
COMPILE_BACKENDS = [p for p in OPS] + [pytest.param("torch", id="torch")]


def _op_args(inp, scale):
    x = inp["x"].reshape(-1, inp["x"].shape[-1])
    ids = inp["stitch_ids"]
    if isinstance(ids, int):
        ids = torch.tensor([ids])
    elif ids is not None:
        ids = ids.reshape(-1)
    return (x, inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["stitch_bias"], ids, scale)


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("ids", ["rows", "int", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_opcheck_forward(backend, ids, dtype):
    if backend == "triton" and dtype == torch.float64:
        dtype = torch.float16  # the triton backend has no float64; check its float16 path instead
    from esta_kernels import _ops

    inp = make_inputs(13, 19, 21, 3, 4, dtype=dtype, ids=ids, requires_grad=True)
    torch.library.opcheck(_ops.FORWARD_OPS[backend], _op_args(inp, 0.5))
    no_lora = make_inputs(5, 19, 21, 3, None, dtype=dtype, lora=False, bias=False, ids="none")
    torch.library.opcheck(_ops.FORWARD_OPS[backend], _op_args(no_lora, 1.0))


@pytest.mark.parametrize("backend", OPS)
@pytest.mark.parametrize("mask", [(True, True, True, True), (False, True, False, True), (True, False, False, False)])
def test_opcheck_backward(backend, mask):
    from esta_kernels import _ops

    inp = make_inputs(13, 19, 21, 3, 4, ids="rows")
    x, w, _, a, b, sb, ids, scale = _op_args(inp, 0.5)
    _, xa = _ops.FORWARD_OPS[backend](x, w, None, a, b, sb, ids, scale)
    dy = torch.randn(13, 21)
    torch.library.opcheck(_ops.BACKWARD_OPS[backend], (dy, x, w, a, b, xa, ids, 4, scale, list(mask)))


class _Block(torch.nn.Module):
    def __init__(self, backend, K=24, N=40, r=4, S=5):
        super().__init__()
        self.backend = backend
        self.inp = torch.nn.Linear(K, K)
        self.weight = torch.nn.Parameter(torch.randn(N, K) / K ** 0.5, requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(N), requires_grad=False)
        self.lora_a = torch.nn.Parameter(torch.randn(r, K) / K ** 0.5)
        self.lora_b = torch.nn.Parameter(torch.randn(N, r))
        self.stitch_bias = torch.nn.Parameter(torch.randn(S, N))

    def forward(self, x, ids):
        h = torch.relu(self.inp(x))
        y = esta_kernels.stitched_linear(h, self.weight, self.bias, self.lora_a, self.lora_b, self.stitch_bias, ids,
                                         scale=0.5, backend=self.backend)
        return (y * y).sum(-1)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = _Block(backend)
    x = torch.randn(3, 7, 24)
    ids = torch.randint(-1, 5, (3, 7))
    eager = model(x, ids)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    out = compiled(x, ids)
    out.sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, g, atol=1e-4, rtol=1e-4)


AUTOCAST = [pytest.param(b, torch.bfloat16, id=f"{b}-bf16") for b in ("torch", "cpu") if b in AVAILABLE]
if "triton" in AVAILABLE:
    # the interpreter has no bfloat16
    AUTOCAST.append(pytest.param("triton", torch.float16, marks=pytest.mark.interpreter, id="triton-f16"))


@pytest.mark.parametrize("backend,dtype", AUTOCAST)
def test_autocast(backend, dtype):
    """Under autocast the op runs in the autocast dtype like F.linear; float32 LoRA and stitch-bias
    parameters stay float32 masters and get float32 gradients."""
    inp = make_inputs(17, 24, 40, 4, 5, dtype=torch.float32, ids="rows", requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = esta_kernels.stitched_linear(**inp, scale=0.5, backend=backend)
        y_lin = torch.nn.functional.linear(inp["x"], inp["weight"], inp["bias"])
    assert y.dtype == y_lin.dtype == dtype
    cast = {k: (v.detach().to(dtype) if k in ("x", "weight", "bias") else v) for k, v in inp.items()}
    ref = reference(cast, 0.5)
    torch.testing.assert_close(y.double(), ref, atol=3e-2, rtol=3e-2)
    y.float().sum().backward()
    for name in ("x", "lora_a", "lora_b", "stitch_bias"):
        assert inp[name].grad is not None and inp[name].grad.dtype == torch.float32
        assert torch.isfinite(inp[name].grad).all()


@pytest.mark.parametrize("backend,dtype", AUTOCAST)
def test_autocast_with_low_precision_input(backend, dtype):
    """As with F.linear, an input already in the autocast dtype (the output of an earlier autocast op) meets
    a float32 weight without a dtype error."""
    inp = make_inputs(9, 16, 24, 4, 3, dtype=torch.float32, ids="rows")
    inp["x"] = inp["x"].to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        y = esta_kernels.stitched_linear(**inp, scale=0.5, backend=backend)
    assert y.dtype == dtype
    cast = {k: (v.to(dtype) if k in ("weight", "bias") else v) for k, v in inp.items()}
    torch.testing.assert_close(y.double(), reference(cast, 0.5), atol=3e-2, rtol=3e-2)
    with pytest.raises(TypeError, match="share one dtype"):  # outside autocast it stays an error
        esta_kernels.stitched_linear(**inp, scale=0.5, backend=backend)


def test_cuda_kernels_registered_when_built_with_cuda():
    """A build with CUDA registers the CUDA kernels of both ops (checked without a GPU)."""
    from esta_kernels import _ext

    if not _ext.HAS_EXTENSION:
        pytest.skip(f"esta_kernels._C is not built: {_ext.EXTENSION_ERROR}")
    asked = os.environ.get("ESTA_BUILD_CUDA", "").lower() == "1"
    if not _ext.has_cuda_kernels():
        if asked and torch.version.cuda is not None:
            pytest.fail("ESTA_BUILD_CUDA=1 but esta_kernels._C has no CUDA kernels: rebuild the extension")
        pytest.skip(
            "esta_kernels._C was built without CUDA kernels (ESTA_BUILD_CUDA=0, a CPU-only torch, or no nvcc); "
            "set ESTA_BUILD_CUDA=1 to build and check them"
        )
    assert torch.version.cuda is not None
    for op in ("esta::stitched_linear", "esta::stitched_linear_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
