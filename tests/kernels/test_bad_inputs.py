"""Every bad input raises a clear error that names the problem, on every backend testable here."""
import pytest
import torch

import esta_kernels
from tests.helpers.inputs import make_inputs

AVAILABLE = esta_kernels.available_backends()
BACKENDS = [pytest.param(b, marks=[pytest.mark.interpreter] if b == "triton" else [], id=b)
            for b in ("torch", "cpu", "triton") if b in AVAILABLE]
OP_BACKENDS = [p for p in BACKENDS if p.values[0] != "torch"]


def _inp(**kw):
    return make_inputs(9, 12, 10, 3, 4, ids="rows", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [4, 5, -2, 1000, -1000])
def test_int_id_out_of_range(backend, bad):
    with pytest.raises(IndexError, match=r"outside \[-1, 4\)"):
        esta_kernels.stitched_linear(**{**_inp(), "stitch_ids": bad}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [4, -2, 2**40])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_tensor_id_out_of_range(backend, bad, dtype):
    if dtype == torch.int32 and bad >= 2**31:
        bad = 2**31 - 1
    inp = _inp()
    ids = inp["stitch_ids"].clone().to(dtype)
    ids[5] = bad
    with pytest.raises(IndexError, match=r"outside \[-1, 4\)"):
        esta_kernels.stitched_linear(**{**inp, "stitch_ids": ids}, backend=backend)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_op_called_directly_rejects_bad_ids(backend):
    """The registered ops check the id range themselves, not only the Python front end."""
    from esta_kernels import _ops

    inp = _inp()
    ids = inp["stitch_ids"].clone()
    ids[0] = 4
    args = (inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["stitch_bias"], ids, 1.0)
    with pytest.raises(IndexError, match="outside"):
        _ops.FORWARD_OPS[backend](*args)
    dy = torch.randn(9, 10)
    xa = torch.zeros(9, 3)
    with pytest.raises(IndexError, match="outside"):
        _ops.BACKWARD_OPS[backend](dy, inp["x"], inp["weight"], inp["lora_a"], inp["lora_b"], xa, ids, 4, 1.0,
                                   [True, True, True, True])


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_ids(backend):
    inp = _inp()
    with pytest.raises(TypeError, match="stitch_ids must be an integer tensor"):
        esta_kernels.stitched_linear(**{**inp, "stitch_ids": inp["stitch_ids"].float()}, backend=backend)
    with pytest.raises(TypeError, match="stitch_ids must be an int"):
        esta_kernels.stitched_linear(**{**inp, "stitch_ids": 1.0}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(8,), (9, 1), (3, 3)])
def test_ids_wrong_shape(backend, shape):
    with pytest.raises(ValueError, match="stitch_ids must be an int, a 0-d tensor, or have x's leading shape"):
        esta_kernels.stitched_linear(**{**_inp(), "stitch_ids": torch.zeros(shape, dtype=torch.long)}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_mismatch(backend):
    inp = _inp()
    with pytest.raises(ValueError, match="last dimension .* must equal weight's in_features"):
        esta_kernels.stitched_linear(**{**inp, "x": torch.randn(9, 13)}, backend=backend)
    with pytest.raises(ValueError, match="lora_a must have shape"):
        esta_kernels.stitched_linear(**{**inp, "lora_a": torch.randn(3, 11)}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_mismatch(backend):
    inp = _inp()
    with pytest.raises(ValueError, match="lora_b must have shape .* to match lora_a's rank"):
        esta_kernels.stitched_linear(**{**inp, "lora_b": torch.randn(10, 4)}, backend=backend)
    with pytest.raises(ValueError, match="lora_a and lora_b must be given together"):
        esta_kernels.stitched_linear(**{**inp, "lora_b": None}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_shape_errors(backend):
    inp = _inp()
    with pytest.raises(ValueError, match="bias must have shape"):
        esta_kernels.stitched_linear(**{**inp, "bias": torch.randn(11)}, backend=backend)
    with pytest.raises(ValueError, match="stitch_bias must have shape"):
        esta_kernels.stitched_linear(**{**inp, "stitch_bias": torch.randn(4, 11)}, backend=backend)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        esta_kernels.stitched_linear(**{**inp, "weight": torch.randn(10, 12, 1)}, backend=backend)
    with pytest.raises(ValueError, match="stitch_ids were given but stitch_bias is None"):
        esta_kernels.stitched_linear(**{**inp, "stitch_bias": None}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_mismatch(backend):
    inp = _inp()
    with pytest.raises(TypeError, match="x and weight must share one dtype"):
        esta_kernels.stitched_linear(**{**inp, "weight": inp["weight"].double()}, backend=backend)
    with pytest.raises(TypeError, match="bias must have x's dtype"):
        esta_kernels.stitched_linear(**{**inp, "bias": inp["bias"].half()}, backend=backend)
    with pytest.raises(TypeError, match="lora_a must be"):
        esta_kernels.stitched_linear(**{**inp, "lora_a": inp["lora_a"].half()}, backend=backend)
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64"):
        esta_kernels.stitched_linear(**{**inp, "x": inp["x"].long(), "weight": inp["weight"].long()},
                                     backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["weight", "bias", "lora_a", "lora_b", "stitch_bias", "stitch_ids"])
def test_tensors_on_different_devices(backend, name):
    inp = _inp()
    inp[name] = inp[name].to("meta")
    with pytest.raises(ValueError, match=f"all tensors must be on one device: x is on cpu, {name} on meta"):
        esta_kernels.stitched_linear(**inp, backend=backend)


def test_unknown_backend_and_wrong_device():
    inp = _inp()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        esta_kernels.stitched_linear(**inp, backend="fast")
    with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors"):
        esta_kernels.stitched_linear(**inp, backend="cuda")


def test_env_override(monkeypatch):
    monkeypatch.setenv("ESTA_BACKEND", "torch")
    assert esta_kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("ESTA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="ESTA_BACKEND='nonsense'"):
        esta_kernels.resolve_backend("auto", torch.device("cpu"))


def test_id_checks_have_no_memo_and_gpu_ids_are_never_read_by_the_host(monkeypatch):
    """Host ids are checked on every call (no cache keyed on a tensor's identity or version); ids on a GPU
    are left to the kernels' flag and torch._assert_async (esta_kernels._validate), never read by the host."""
    from esta_kernels import _validate

    assert not hasattr(_validate, "remember_ids_range") and not hasattr(_validate, "_ID_RANGES")
    ids = torch.randint(-1, 4, (9,))
    _validate.check_ids_range(ids, 4)
    ids[3] = 7  # written in place: the very next check sees it
    with pytest.raises(IndexError, match=r"stitch id 7 is outside \[-1, 4\)"):
        _validate.check_ids_range(ids, 4)
    assert _validate.ids_checked_on_host(ids)
    assert not _validate.ids_checked_on_host(torch.empty(3, dtype=torch.int64, device="meta"))
    flag = _validate.new_bad_id_flag(torch.device("cpu"))
    _validate.report_bad_ids(flag, 4)  # a flag left at 1 (every id good) reports nothing
    flag.fill_(0)
    with pytest.raises(RuntimeError, match=r"stitch id is outside \[-1, 4\)"):
        _validate.report_bad_ids(flag, 4)
    _validate.assert_ids_in_range_async(torch.tensor([-1, 0, 3]), 4)
    with pytest.raises(RuntimeError, match=r"stitch id is outside \[-1, 4\)"):
        _validate.assert_ids_in_range_async(torch.tensor([-1, 0, 4]), 4)
    # an int id is checked on the host and made with a fill: no read of a tensor
    inp = dict(x=torch.randn(5, 8), weight=torch.randn(6, 8), stitch_bias=torch.randn(3, 6))
    monkeypatch.setattr(_validate.torch, "aminmax", lambda *a, **k: pytest.fail("ids were read"))
    esta_kernels.stitched_linear(**inp, stitch_ids=2, backend="cpu" if "cpu" in esta_kernels.available_backends()
                                 else "torch")
    with pytest.raises(IndexError, match=r"stitch id 3 is outside \[-1, 3\)"):
        esta_kernels.stitched_linear(**inp, stitch_ids=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["2", None, True, torch.tensor(2.0), 1j])
def test_scale_must_be_a_real_number_on_every_backend(backend, bad):
    with pytest.raises(TypeError, match="scale must be a real number"):
        esta_kernels.stitched_linear(**_inp(), scale=bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_must_be_finite_and_numpy_floats_work(backend):
    import numpy as np

    with pytest.raises(ValueError, match="scale must be finite"):
        esta_kernels.stitched_linear(**_inp(), scale=float("nan"), backend=backend)
    inp = _inp(seed=1)
    torch.testing.assert_close(esta_kernels.stitched_linear(**inp, scale=np.float32(0.5), backend=backend),
                               esta_kernels.stitched_linear(**inp, scale=0.5, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [2**64 - 1, 2**63, 4])
def test_uint64_ids_do_not_wrap(backend, bad):
    """uint64 2^64 - 1 once wrapped to -1 ("no stitch bias") in the int64 cast; every id >= S raises."""
    inp = _inp()
    ids = inp["stitch_ids"].clamp_min(0).to(torch.uint64)
    ids[2] = bad
    with pytest.raises(IndexError, match=r"outside \[-1, 4\)"):
        esta_kernels.stitched_linear(**{**inp, "stitch_ids": ids}, backend=backend)


def test_meta_tensors_on_the_torch_backend():
    """Shape inference on the meta device: no id values to read, the output shape comes back."""
    inp = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in _inp().items()}
    y = esta_kernels.stitched_linear(**inp, backend="torch")
    assert y.device.type == "meta" and y.shape == (9, 10)


@pytest.mark.parametrize("bad", [-3, 4, 7])
@pytest.mark.parametrize("kind", ["rows", "int-tensor"])
def test_out_of_range_ids_under_compile_raise_on_the_torch_backend(bad, kind):
    """Under torch.compile the id range cannot be read on the host while tracing: a device-side assert
    raises when the compiled code runs (id -3 was silently "no bias", 7 hit an Inductor index assert)."""
    inp = _inp()
    if kind == "rows":
        ids = inp["stitch_ids"].clone()
        ids[4] = bad
    else:
        ids = torch.tensor(bad)
    fn = torch.compile(lambda x, i: esta_kernels.stitched_linear(**{**inp, "x": x, "stitch_ids": i}, backend="torch"),
                       fullgraph=True)
    good = inp["stitch_ids"]
    torch.testing.assert_close(fn(inp["x"], good), esta_kernels.stitched_linear(**inp, backend="torch"))
    with pytest.raises(RuntimeError, match=r"stitch id is outside \[-1, S\)"):
        fn(inp["x"], ids)
    torch._dynamo.reset()
