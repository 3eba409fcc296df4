"""esta.nn.StitchedLinear: the module around the fused op (CPU, fast).

Every numeric check is against the float64 reference `esta_kernels.reference.torch_stitched_linear` or a
plain nn.Linear. Backends: "torch" always, "cpu" when the C++ kernels are built.
"""
import copy
import math
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import esta
import esta_kernels
from esta.nn import StitchedLinear
from esta_kernels.reference import torch_stitched_linear

CPU_BACKENDS = [b for b in ("torch", "cpu") if b in esta_kernels.available_backends()]

IN, OUT, RANK, STITCHES = 37, 23, 5, 4  # odd sizes on purpose


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_layer(backend="torch", bias=True, num_stitches=STITCHES, lora_alpha=None, randomize=True, dtype=None):
    """A StitchedLinear built from a random nn.Linear; `randomize` fills lora_b and stitch_bias so that every
    term of the sum shows in the output."""
    linear = nn.Linear(IN, OUT, bias=bias, dtype=dtype)
    layer = StitchedLinear.from_linear(
        linear, rank=RANK, num_stitches=num_stitches, lora_alpha=lora_alpha, backend=backend
    )
    if randomize:
        with torch.no_grad():
            layer.lora_b.normal_()
            if layer.stitch_bias is not None:
                layer.stitch_bias.normal_()
    return layer


def reference(layer, x, ids):
    """The module's output in float64 through the reference."""
    def d(t):
        return None if t is None else t.detach().double()

    return torch_stitched_linear(
        d(x), d(layer.weight), d(layer.bias), d(layer.lora_a), d(layer.lora_b), d(layer.stitch_bias),
        ids, scale=layer.scale,
    )


# ----------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_fresh_layer_equals_linear_for_every_stitch(backend, bias):
    linear = nn.Linear(IN, OUT, bias=bias)
    layer = StitchedLinear.from_linear(linear, rank=RANK, num_stitches=STITCHES, backend=backend)
    x = torch.randn(3, 7, IN)
    expected = linear(x)
    for stitch in [None, -1, *range(STITCHES)]:
        layer.stitch_ids = stitch
        torch.testing.assert_close(layer(x), expected)
    layer.stitch_ids = torch.tensor([[-1, 0, 1, 2, 3, 0, 1]] * 3)
    torch.testing.assert_close(layer(x), expected)


def test_constructor_initialization():
    layer = StitchedLinear(IN, OUT, rank=RANK, num_stitches=STITCHES, lora_alpha=10)
    assert isinstance(layer, nn.Linear)
    assert layer.lora_a.shape == (RANK, IN) and layer.lora_b.shape == (OUT, RANK)
    assert layer.stitch_bias.shape == (STITCHES, OUT)
    # kaiming-uniform with a = sqrt(5) draws from U(-1/sqrt(in), 1/sqrt(in))
    assert 0 < layer.lora_a.abs().max() <= 1 / math.sqrt(IN)
    assert torch.count_nonzero(layer.lora_b) == 0 and torch.count_nonzero(layer.stitch_bias) == 0
    assert layer.scale == 10 / RANK
    assert StitchedLinear(IN, OUT, rank=4, num_stitches=1).scale == 1.0  # lora_alpha defaults to rank
    assert layer.stitch_ids == -1
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


def test_meta_init_then_to_empty_and_reset():
    layer = StitchedLinear(IN, OUT, rank=RANK, num_stitches=STITCHES, backend="torch", device="meta")
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert layer.stitch_ids == -1 and torch.count_nonzero(layer.lora_b) == 0
    x = torch.randn(2, IN)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_no_stitches_means_no_stitch_bias():
    layer = StitchedLinear(IN, OUT, rank=RANK, num_stitches=0, backend="torch")
    assert layer.stitch_bias is None
    assert "stitch_bias" not in layer.state_dict()
    layer.stitch_ids = None
    x = torch.randn(4, IN)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    with pytest.raises(IndexError, match="num_stitches=0"):
        layer.stitch_ids = 0


def test_from_linear_shares_and_freezes_the_tensors():
    linear = nn.Linear(IN, OUT)
    weight, bias = linear.weight, linear.bias
    layer = StitchedLinear.from_linear(linear, rank=RANK, num_stitches=STITCHES)
    assert layer.weight is weight and layer.bias is bias
    assert not weight.requires_grad and not bias.requires_grad
    assert layer.lora_a.device == weight.device and not layer.lora_a.is_meta
    assert layer._stitch_id.device == weight.device

    no_bias = StitchedLinear.from_linear(nn.Linear(IN, OUT, bias=False), rank=RANK, num_stitches=STITCHES)
    assert no_bias.bias is None

    with pytest.raises(TypeError, match="nn.Linear"):
        StitchedLinear.from_linear(nn.Conv1d(3, 3, 1), rank=RANK, num_stitches=STITCHES)
    with pytest.raises(TypeError, match="already a StitchedLinear"):
        StitchedLinear.from_linear(layer, rank=RANK, num_stitches=STITCHES)


def test_only_adapters_are_trainable():
    for layer in (make_layer(), StitchedLinear(IN, OUT, rank=RANK, num_stitches=STITCHES)):
        trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
        assert trainable == {"lora_a", "lora_b", "stitch_bias"}


@pytest.mark.parametrize("weight_dtype, adapter_dtype", [
    (torch.float32, torch.float32), (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
])
def test_adapter_dtype(weight_dtype, adapter_dtype):
    layer = StitchedLinear(IN, OUT, rank=RANK, num_stitches=STITCHES, dtype=weight_dtype)
    assert layer.weight.dtype == weight_dtype
    assert {layer.lora_a.dtype, layer.lora_b.dtype, layer.stitch_bias.dtype} == {adapter_dtype}
    from_linear = StitchedLinear.from_linear(nn.Linear(IN, OUT, dtype=weight_dtype), rank=RANK, num_stitches=1)
    assert from_linear.lora_a.dtype == adapter_dtype


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bfloat16_layer_with_float32_master_adapters(backend):
    layer = make_layer(backend, dtype=torch.bfloat16)
    layer.stitch_ids = 2
    x = torch.randn(5, IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference(layer, x, 2), atol=0.1, rtol=0.02)
    y.float().sum().backward()
    assert layer.lora_a.grad.dtype == torch.float32 and layer.stitch_bias.grad.dtype == torch.float32


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0, num_stitches=1), "rank must be at least 1"),
    (dict(rank=-3, num_stitches=1), "rank must be at least 1"),
    (dict(rank=2, num_stitches=-1), "num_stitches must be at least 0"),
    (dict(rank=2, num_stitches=1, lora_alpha=0), "lora_alpha must be a positive"),
    (dict(rank=2, num_stitches=1, lora_alpha=-1.5), "lora_alpha must be a positive"),
    (dict(rank=2, num_stitches=1, backend="gpu"), "backend must be one of"),
])
def test_bad_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StitchedLinear(IN, OUT, **kwargs)
    with pytest.raises(ValueError, match=message):
        StitchedLinear.from_linear(nn.Linear(IN, OUT), **kwargs)


def test_bad_hyperparameter_types_raise_type_error():
    with pytest.raises(TypeError, match="rank must be an int"):
        StitchedLinear(IN, OUT, rank=2.0, num_stitches=1)
    with pytest.raises(TypeError, match="num_stitches must be an int"):
        StitchedLinear(IN, OUT, rank=2, num_stitches=None)


# ------------------------------------------------------------------------------------------ stitch ids
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("stitch", [None, -1, 0, 3])
def test_int_ids_match_reference(backend, stitch):
    layer = make_layer(backend)
    layer.stitch_ids = stitch
    assert layer.stitch_ids == (-1 if stitch is None else stitch)
    x = torch.randn(2, 9, IN)
    expected = reference(layer, x, None if stitch is None else stitch)
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 13)])
def test_per_row_ids_match_reference(backend, shape):
    layer = make_layer(backend)
    ids = torch.randint(-1, STITCHES, shape)
    layer.stitch_ids = ids
    assert layer.stitch_ids is ids
    x = torch.randn(*shape, IN)
    torch.testing.assert_close(layer(x).double(), reference(layer, x, ids), atol=1e-5, rtol=1e-5)
    # a 0-d tensor is one id for every row
    layer.stitch_ids = torch.tensor(2)
    torch.testing.assert_close(layer(x).double(), reference(layer, x, 2), atol=1e-5, rtol=1e-5)
    # setting an int drops the per-row ids
    layer.stitch_ids = 1
    assert layer.stitch_ids == 1
    torch.testing.assert_close(layer(x).double(), reference(layer, x, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_row_ids_out_of_range_raise_in_forward(backend):
    layer = make_layer(backend)
    layer.stitch_ids = torch.tensor([0, STITCHES, -1])
    with pytest.raises(IndexError):
        layer(torch.randn(3, IN))
    layer.stitch_ids = torch.tensor([0, 1])  # wrong leading shape
    with pytest.raises(ValueError, match="leading shape"):
        layer(torch.randn(3, IN))


def test_per_row_ids_on_another_device_raise():
    layer = make_layer()
    layer.stitch_ids = torch.zeros(3, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="stitch_ids are on meta but the input is on cpu"):
        layer(torch.randn(3, IN))


def test_setter_errors():
    layer = make_layer()
    layer.stitch_ids = 2
    for bad in (STITCHES, -2, 100):
        with pytest.raises(IndexError, match=r"outside \[-1, 4\)"):
            layer.stitch_ids = bad
    assert layer.stitch_ids == 2  # a rejected id leaves the old one
    for bad in (1.0, "1", True):
        with pytest.raises(TypeError, match="stitch_ids must be an int"):
            layer.stitch_ids = bad
    for bad in (torch.zeros(3), torch.zeros(3, dtype=torch.bool)):
        with pytest.raises(TypeError, match="integer tensor"):
            layer.stitch_ids = bad
    assert layer.stitch_ids == 2


# ------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ids_kind", ["none", "int", "rows"])
def test_gradients_match_reference(backend, ids_kind):
    layer = make_layer(backend, lora_alpha=7)
    x = torch.randn(3, 11, IN, requires_grad=True)
    ids = {"none": None, "int": 3, "rows": torch.randint(-1, STITCHES, (3, 11))}[ids_kind]
    layer.stitch_ids = ids
    grad = torch.randn(3, 11, OUT)
    layer(x).backward(grad)
    assert layer.weight.grad is None and layer.bias.grad is None

    leaves = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters() if p.requires_grad}
    x64 = x.detach().double().requires_grad_()
    y64 = torch_stitched_linear(
        x64, layer.weight.double(), layer.bias.double(), leaves["lora_a"], leaves["lora_b"],
        leaves["stitch_bias"], ids, scale=layer.scale,
    )
    y64.backward(grad.double())
    for name, leaf in leaves.items():
        got = getattr(layer, name).grad
        assert got.dtype == torch.float32
        want = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad  # no id: stitch_bias unused
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5, msg=name)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_switching_stitch_between_forward_and_backward(backend):
    # ESTA trains the anchor and a stitch in one step: two forwards with different ids, one backward.
    layer = make_layer(backend)
    x = torch.randn(6, IN)
    layer.stitch_ids = 0
    y0 = layer(x)
    layer.stitch_ids = 3
    y3 = layer(x)
    layer.stitch_ids = -1
    (y0.sum() + 2 * y3.sum()).backward()
    col = torch.full((OUT,), 6.0)
    torch.testing.assert_close(layer.stitch_bias.grad[0], col)
    torch.testing.assert_close(layer.stitch_bias.grad[3], 2 * col)
    assert torch.count_nonzero(layer.stitch_bias.grad[1:3]) == 0


# ------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_merged_equals_module(backend, bias):
    layer = make_layer(backend, bias=bias, lora_alpha=3)
    x = torch.randn(4, 5, IN)
    for stitch in [None, -1, 0, 2, 3]:
        layer.stitch_ids = stitch
        merged = layer.merged(stitch)
        assert type(merged) is nn.Linear
        assert merged.bias is not None  # the layer has stitch biases, so every stitch merges with a bias
        assert merged.weight.dtype == layer.weight.dtype and merged.weight.device == layer.weight.device
        assert merged.weight.data_ptr() != layer.weight.data_ptr()
        assert not merged.weight.requires_grad
        torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)


def test_merged_without_any_bias_and_bad_stitch():
    layer = make_layer(bias=False, num_stitches=0)
    merged = layer.merged(None)
    assert type(merged) is nn.Linear and merged.bias is None
    x = torch.randn(3, IN)
    torch.testing.assert_close(merged(x), layer(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(IndexError):
        make_layer().merged(STITCHES)
    with pytest.raises(TypeError):
        make_layer().merged(1.5)


def test_merged_float64_is_exact():
    layer = make_layer().to(torch.float64)
    x = torch.randn(3, IN, dtype=torch.float64)
    layer.stitch_ids = 1
    torch.testing.assert_close(layer.merged(1)(x), reference(layer, x, 1), atol=1e-12, rtol=1e-12)


# -------------------------------------------------------------------------------------- module plumbing
def test_state_dict_keys_and_linear_checkpoint():
    layer = make_layer()
    assert list(layer.state_dict()) == ["weight", "bias", "lora_a", "lora_b", "stitch_bias"]  # no id buffer
    layer.stitch_ids = 2

    checkpoint = nn.Linear(IN, OUT).state_dict()
    adapters = {n: getattr(layer, n).detach().clone() for n in ("lora_a", "lora_b", "stitch_bias")}
    result = layer.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(layer.weight, checkpoint["weight"])
    torch.testing.assert_close(layer.bias, checkpoint["bias"])
    for name, value in adapters.items():
        torch.testing.assert_close(getattr(layer, name), value)
    assert layer.stitch_ids == 2
    assert not layer.weight.requires_grad  # loading copies values, the parameters stay frozen

    # inside a bigger model, with prefixes
    model = nn.Sequential(nn.Linear(IN, IN), nn.Linear(IN, OUT))
    model[1] = StitchedLinear.from_linear(model[1], rank=RANK, num_stitches=STITCHES)
    model.load_state_dict(nn.Sequential(nn.Linear(IN, IN), nn.Linear(IN, OUT)).state_dict(), strict=True)

    # a full round trip
    other = make_layer(randomize=False)
    other.load_state_dict(layer.state_dict(), strict=True)
    for name, p in layer.state_dict().items():
        torch.testing.assert_close(other.state_dict()[name], p)

    # some adapter keys but not all is a broken checkpoint, reported as usual
    partial = dict(layer.state_dict())
    del partial["lora_b"]
    with pytest.raises(RuntimeError, match="lora_b"):
        other.load_state_dict(partial, strict=True)
    # a checkpoint without this layer at all still reports every missing key
    missing = other.load_state_dict({}, strict=False).missing_keys
    assert set(missing) == {"weight", "bias", "lora_a", "lora_b", "stitch_bias"}


def test_deepcopy_is_independent():
    layer = make_layer()
    layer.stitch_ids = 3
    clone = copy.deepcopy(layer)
    assert clone.stitch_ids == 3 and clone.weight is not layer.weight
    x = torch.randn(2, IN)
    torch.testing.assert_close(clone(x), layer(x))
    clone.stitch_ids = 1
    with torch.no_grad():
        clone.lora_b.zero_()
    assert layer.stitch_ids == 3 and torch.count_nonzero(layer.lora_b) > 0
    assert not clone.weight.requires_grad and clone.lora_a.requires_grad


def test_to_float64():
    layer = make_layer()
    layer.stitch_ids = 2
    layer = layer.to(torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert layer._stitch_id.dtype == torch.int64 and layer.stitch_ids == 2
    x = torch.randn(4, IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(layer, x, 2), atol=1e-12, rtol=1e-12)


def test_repr():
    layer = StitchedLinear(IN, OUT, bias=False, rank=RANK, num_stitches=STITCHES, lora_alpha=16)
    assert repr(layer) == (
        f"StitchedLinear(in_features={IN}, out_features={OUT}, bias=False, rank={RANK}, "
        f"num_stitches={STITCHES}, lora_alpha=16)"
    )
    assert "backend='torch'" in repr(make_layer("torch"))


def test_package_exports():
    assert esta.nn.StitchedLinear is StitchedLinear
    assert isinstance(esta.__version__, str)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
def test_ddp_single_process_matches_plain_module():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    layer = make_layer()
    plain = copy.deepcopy(layer)
    x = torch.randn(6, IN)
    ids = torch.randint(-1, STITCHES, (6,))
    grad = torch.randn(6, OUT)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(layer)
        for stitch in (2, ids):
            layer.stitch_ids = stitch
            plain.stitch_ids = stitch
            layer.zero_grad()
            plain.zero_grad()
            ddp(x).backward(grad)
            plain(x).backward(grad)
            for name in ("lora_a", "lora_b", "stitch_bias"):
                torch.testing.assert_close(getattr(layer, name).grad, getattr(plain, name).grad, msg=name)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_matches_eager_and_switching_ids_does_not_recompile(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    layer = make_layer(backend)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    x = torch.randn(3, 5, IN, requires_grad=True)
    for stitch in (0, 3, -1, None, 1):
        layer.stitch_ids = stitch
        y = compiled(x)
        torch.testing.assert_close(y, layer(x))
        torch.testing.assert_close(y.double(), reference(layer, x, stitch), atol=1e-5, rtol=1e-5)
        assert counter.frame_count == 1, f"recompiled after switching to stitch {stitch}"

    # gradients through the compiled module equal eager ones
    layer.stitch_ids = 2
    compiled(x).sum().backward()
    compiled_grads = [p.grad.clone() for p in (layer.lora_a, layer.lora_b, layer.stitch_bias)] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    layer(x).sum().backward()
    eager_grads = [layer.lora_a.grad, layer.lora_b.grad, layer.stitch_bias.grad, x.grad]
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want)
    assert counter.frame_count == 1
    torch._dynamo.reset()



def test_compile_with_auto_backend():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    layer = make_layer("auto")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    x = torch.randn(4, IN)
    try:
        for stitch in (0, 3, -1):
            layer.stitch_ids = stitch
            torch.testing.assert_close(compiled(x), layer(x))
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------- copies keep the selected stitch
COPY_KINDS = ("deepcopy", "pickle", "torch.save", "load_state_dict", "to", "_apply")
# switch sequences before and after the copy: every length from 1 to 4, repeating ids on purpose (the bug
# this guards against was a cached id keyed on the buffer's version counter, which copies restart)
SEQUENCES = ((1,), (0, 1), (2, 0, 2), (3, 1, -1, 1))


def _copy_module(layer, kind, tmp_path):
    import pickle

    if kind == "deepcopy":
        return copy.deepcopy(layer)
    if kind == "pickle":
        return pickle.loads(pickle.dumps(layer))
    if kind == "torch.save":
        path = tmp_path / "layer.pt"
        torch.save(layer, path)
        return torch.load(path, weights_only=False)
    if kind == "load_state_dict":
        other = make_layer(randomize=False)
        other.load_state_dict(layer.state_dict())
        other.stitch_ids = layer.stitch_ids  # the id is not state: it is set again after loading
        return other
    if kind == "to":
        return layer.to(torch.float64)
    # _apply with new tensors, as a move to another device does: a new id buffer whose version restarts
    return layer._apply(lambda t: t.clone())


@pytest.mark.parametrize("kind", COPY_KINDS)
@pytest.mark.parametrize("before", SEQUENCES)
@pytest.mark.parametrize("after", SEQUENCES)
def test_copies_use_the_stitch_selected_after_the_copy(kind, before, after, tmp_path):
    layer = make_layer("auto")
    for stitch in before:
        layer.stitch_ids = stitch
        x = torch.randn(3, IN)
        torch.testing.assert_close(layer(x).double(), reference(layer, x, stitch), atol=1e-5, rtol=1e-5)
    clone = _copy_module(layer, kind, tmp_path)
    dtype = clone.weight.dtype
    assert clone.stitch_ids == before[-1]
    for stitch in after:
        clone.stitch_ids = stitch
        x = torch.randn(3, IN, dtype=dtype)
        torch.testing.assert_close(clone(x).double(), reference(clone, x, stitch), atol=1e-5, rtol=1e-5,
                                   msg=f"{kind}: stitch {stitch} after {before}")
    if clone is not layer:  # the original keeps its own stitch
        x = torch.randn(3, IN)
        torch.testing.assert_close(layer(x).double(), reference(layer, x, before[-1]), atol=1e-5, rtol=1e-5)


def test_an_in_place_write_to_the_id_buffer_is_seen():
    """Writes that bypass the setter (a DDP buffer broadcast copies into the buffer) select that stitch."""
    layer = make_layer("auto")
    layer.stitch_ids = 1
    x = torch.randn(2, IN)
    layer(x)
    with torch.no_grad():
        layer._stitch_id.copy_(torch.tensor(3))
    torch.testing.assert_close(layer(x).double(), reference(layer, x, 3), atol=1e-5, rtol=1e-5)


_DDP_WORKER = r"""
import sys, torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from esta.nn import StitchedLinear
from esta_kernels.reference import torch_stitched_linear

rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
torch.manual_seed(0)
layer = StitchedLinear.from_linear(nn.Linear(7, 5), rank=2, num_stitches=4)
with torch.no_grad():
    layer.lora_b.normal_(); layer.stitch_bias.normal_()
x = torch.randn(3, 7)
# each rank switches on its own, and runs once (a cached id exists), then DDP with buffer broadcast
for stitch in ((0, 2) if rank == 0 else (1, 3)):
    layer.stitch_ids = stitch
    layer(x)
ddp = DistributedDataParallel(layer, broadcast_buffers=True)
got = ddp(x)
want = torch_stitched_linear(x, layer.weight, layer.bias, layer.lora_a, layer.lora_b, layer.stitch_bias, 2,
                             scale=layer.scale)
torch.testing.assert_close(got, want)  # rank 0's stitch on every rank
assert layer.stitch_ids == 2
dist.destroy_process_group()
print("ok", rank)
"""


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs gloo"
)
def test_ddp_buffer_broadcast_selects_rank_zeros_stitch(tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT as root

    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    store = str(tmp_path / "store")
    procs = [subprocess.Popen([sys.executable, "-c", _DDP_WORKER, str(r), store], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ok {r}" in out, out
