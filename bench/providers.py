"""The implementations the benchmarks compare, behind one interface, plus the shared measuring helpers.

Every provider computes the same y = x W^T + b + scale (x A^T) B^T + stitch_bias[ids] (except the floor,
`flinear`, which computes only x W^T + b), with W and b frozen and x, A, B, stitch_bias requiring grad.
The baselines come from esta_kernels.reference, the module the tests use, so the two never diverge.

    flinear        F.linear alone: the floor (forward + dx only, since the weight is frozen)
    naive          esta_kernels.reference.naive_stitched_linear: F.linear + two matmuls + indexed bias
    cublas_accumulate  out = F.linear(x, W, b); out.addmm_(x @ A.T, B.T, alpha=scale); out += sb[ids]
                   (the LoRA term accumulated into the cuBLAS output, as fast LoRA libraries do)
    naive_compile  the same function under torch.compile (mode="max-autotune-no-cudagraphs" on a GPU)
    peft           PEFT's LoRA Linear (lora_dropout=0) plus the same indexed stitch bias as `naive`
    esta_torch     esta_kernels.stitched_linear(backend="torch"): the float32-accumulating reference
    esta_cpu / esta_triton / esta_cuda   esta_kernels.stitched_linear(backend=...)
    esta_triton_fused_xa  esta triton with ESTA_TRITON_XA=fused (xa accumulated in the Hopper main loop)
    esta_triton_thin_g  esta triton with ESTA_TRITON_G=thin (g = scale dy B by its own launch before dx; the
                   default computes it in the dx launch's g jobs)
    esta_triton_plain_gemm  the Hopper path's persistent kernel as a plain GEMM (y = x W^T, dx = dy W): its
                   main loop alone, to set beside F.linear (counted like the floor)

`saved_activation_bytes` says what each provider keeps alive for backward; see its docstring for exactly
what it counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import esta_kernels
from esta_kernels.reference import naive_stitched_linear, torch_stitched_linear

from bench.shapes import Inputs


@dataclass
class Runner:
    """One provider bound to one set of inputs.

    forward() returns y; fwd_bwd() clears the gradients of last time, runs forward and y.backward(grad_y).
    `leaves` are the module-owned leaf tensors (frozen weight, bias, LoRA factors, stitch bias), as the
    provider holds them; `grads` maps the names x, lora_a, lora_b, stitch_bias to the tensors whose .grad
    receives each gradient (PEFT holds its own Parameter objects).
    """

    forward: Callable[[], torch.Tensor]
    grad_y: torch.Tensor
    leaves: list
    grads: dict = field(default_factory=dict)

    def zero_grad(self) -> None:
        for t in self.grads.values():
            t.grad = None

    def fwd_bwd(self) -> None:
        self.zero_grad()
        self.forward().backward(self.grad_y)


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    computes_lora: bool  # False only for the F.linear floor: its FLOP count and reference differ
    _build: Callable[[Inputs], Runner]
    _unavailable: Callable[[torch.device], Optional[str]]

    def unavailable(self, device) -> Optional[str]:
        """None when this provider can run on `device`, else the reason it cannot."""
        return self._unavailable(torch.device(device))

    def build(self, inp: Inputs) -> Runner:
        return self._build(inp)


def _grads_of(inp: Inputs, lora: bool = True) -> dict:
    out = {"x": inp.x}
    if lora:
        out.update(lora_a=inp.lora_a, lora_b=inp.lora_b, stitch_bias=inp.stitch_bias)
    return out


def _always(device) -> Optional[str]:
    return None


# ------------------------------------------------------------------------------------------- builders
def _build_flinear(inp: Inputs) -> Runner:
    x, w, b = inp.x, inp.weight, inp.bias
    return Runner(lambda: F.linear(x, w, b), inp.grad_y, inp.parameters(), _grads_of(inp, lora=False))


def _build_naive(inp: Inputs, fn=naive_stitched_linear) -> Runner:
    i = inp

    def forward():
        return fn(i.x, i.weight, i.bias, i.lora_a, i.lora_b, i.stitch_bias, i.stitch_ids, scale=i.scale)

    return Runner(forward, inp.grad_y, inp.parameters(), _grads_of(inp))


def cublas_accumulate_stitched_linear(x, weight, bias, lora_a, lora_b, stitch_bias, stitch_ids, *, scale):
    """The cuBLAS-accumulate composition: the LoRA up-projection accumulated into F.linear's output by one
    addmm_ (beta = 1), then the gathered stitch-bias rows added (id -1 picks an appended zero row)."""
    out = F.linear(x, weight, bias)
    out.addmm_(x @ lora_a.to(x.dtype).t(), lora_b.to(x.dtype).t(), alpha=scale)
    S, N = stitch_bias.shape
    table = torch.cat([stitch_bias.to(x.dtype), stitch_bias.new_zeros(1, N, dtype=x.dtype)])
    out += table[torch.where(stitch_ids < 0, S, stitch_ids)]
    return out


_COMPILED: dict = {}


def compiled_naive(backend: str = "inductor", mode=None):
    """One torch.compile wrapper per compile backend and mode; dynamo then keeps one graph per shape."""
    key = (backend, mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(naive_stitched_linear, backend=backend, dynamic=False, mode=mode)
    return _COMPILED[key]


def _make_build_compiled(backend: str, mode=None):
    def build(inp: Inputs) -> Runner:
        return _build_naive(inp, compiled_naive(backend, mode))

    return build


def _build_cublas_accumulate(inp: Inputs) -> Runner:
    return _build_naive(inp, cublas_accumulate_stitched_linear)


def _make_build_esta_env(backend: str, env: dict):
    """esta with environment switches set around each call (e.g. ESTA_TRITON_XA=fused)."""
    import os

    inner = _make_build_esta(backend)

    def build(inp: Inputs) -> Runner:
        runner = inner(inp)
        plain_forward = runner.forward

        def forward():
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                return plain_forward()
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

        runner.forward = forward
        return runner

    return build


class _PlainHopperGemm(torch.autograd.Function):
    """y = x W^T and dx = dy W through the Hopper path's persistent kernel, nothing fused."""

    @staticmethod
    def forward(ctx, x, weight):
        from esta_kernels.triton import stitched_linear as sl

        ctx.save_for_backward(weight)
        y = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        sl._launch(sl.plan_tma_gemm(x, weight, y, b_kmajor=True, num_sms=sl._num_sms(x.device)), x.device)
        return y

    @staticmethod
    def backward(ctx, dy):
        from esta_kernels.triton import stitched_linear as sl

        (weight,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty(dy.shape[0], weight.shape[1], dtype=dy.dtype, device=dy.device)
        sl._launch(sl.plan_tma_gemm(dy, weight, dx, b_kmajor=False, num_sms=sl._num_sms(dy.device)), dy.device)
        return dx, None


def _build_plain_gemm(inp: Inputs) -> Runner:
    x, w = inp.x, inp.weight
    return Runner(lambda: _PlainHopperGemm.apply(x, w), inp.grad_y, inp.parameters(), _grads_of(inp, lora=False))


def _hopper_only(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "GPU-only provider"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "the Hopper path runs on sm_90 only"
    return _esta_unavailable("triton", "cuda")(device)


def _peft_missing() -> Optional[str]:
    try:
        import peft  # noqa: F401  (only whether it imports)
        from peft.tuners.lora import Linear  # noqa: F401
    except Exception as exc:  # ImportError, or a peft that fails against this torch/transformers
        return f"peft is not importable ({type(exc).__name__}: {exc}); install the bench extra: pip install -e '.[bench]'"
    return None


def _build_peft(inp: Inputs) -> Runner:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    N, K = inp.weight.shape
    r = inp.lora_a.shape[0]
    alpha = inp.scale * r  # PEFT's scaling is lora_alpha / r
    base = torch.nn.Linear(K, N, bias=inp.bias is not None, device="meta")
    # the module shares storage with our tensors: no copy, and the same numbers as every other provider
    base.weight = torch.nn.Parameter(inp.weight.detach(), requires_grad=False)
    if inp.bias is not None:
        base.bias = torch.nn.Parameter(inp.bias.detach(), requires_grad=False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
    module = LoraLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, lora_dropout=0.0)
    lora_a = module.lora_A["default"]
    lora_b = module.lora_B["default"]
    lora_a.weight = torch.nn.Parameter(inp.lora_a.detach(), requires_grad=True)
    lora_b.weight = torch.nn.Parameter(inp.lora_b.detach(), requires_grad=True)
    assert abs(module.scaling["default"] - inp.scale) < 1e-12, module.scaling
    stitch_bias = torch.nn.Parameter(inp.stitch_bias.detach(), requires_grad=True)
    S = stitch_bias.shape[0]
    rows = torch.where(inp.stitch_ids < 0, S, inp.stitch_ids)  # row S is the zero row that id -1 picks
    x = inp.x

    def forward():
        # PEFT has no per-stitch bias; the same indexed add as the naive composition completes the op
        table = torch.cat([stitch_bias, stitch_bias.new_zeros(1, N)])
        return module(x) + table[rows]

    leaves = [base.weight, lora_a.weight, lora_b.weight, stitch_bias] + ([base.bias] if inp.bias is not None else [])
    grads = {"x": x, "lora_a": lora_a.weight, "lora_b": lora_b.weight, "stitch_bias": stitch_bias}
    return Runner(forward, inp.grad_y, leaves, grads)


def _make_build_esta(backend: str):
    def build(inp: Inputs) -> Runner:
        i = inp

        def forward():
            return esta_kernels.stitched_linear(
                i.x, i.weight, i.bias, i.lora_a, i.lora_b, i.stitch_bias, i.stitch_ids, scale=i.scale, backend=backend
            )

        return Runner(forward, inp.grad_y, inp.parameters(), _grads_of(inp))

    return build


def _esta_unavailable(backend: str, device_type: str):
    def check(device: torch.device) -> Optional[str]:
        if device.type != device_type:
            if backend == "triton" and device.type == "cpu":
                return "esta triton runs on CUDA tensors (the Triton interpreter is for tests, not timings)"
            return f"esta {backend} runs on {device_type.upper()} tensors, not {device.type}"
        have = esta_kernels.available_backends()
        if backend not in have:
            return f"backend {backend!r} is not in esta_kernels.available_backends() = {have}" + (
                f"; esta_kernels._C: {esta_kernels._ext.EXTENSION_ERROR}" if esta_kernels._ext.EXTENSION_ERROR else ""
            )
        return None

    return check


def _cuda_only(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else "GPU-only provider"



PROVIDERS = {
    p.name: p
    for p in (
        Provider("flinear", "F.linear alone (the floor)", False, _build_flinear, _always),
        Provider("naive", "naive composition, eager (esta_kernels.reference.naive_stitched_linear)", True,
                 _build_naive, _always),
        Provider("cublas_accumulate", "F.linear, then addmm_(x A^T, B^T, alpha=scale) into it, + sb[ids]", True,
                 _build_cublas_accumulate, _always),
        Provider("naive_compile", "naive composition under torch.compile (inductor)", True,
                 _make_build_compiled("inductor"), _always),
        Provider("naive_compile_max_autotune",
                 "naive composition under torch.compile(mode='max-autotune-no-cudagraphs')", True,
                 _make_build_compiled("inductor", "max-autotune-no-cudagraphs"), _cuda_only),
        # the CPU dry run of the GPU script: exercises dynamo + AOT autograd without inductor's compile time
        Provider("naive_compile_aot_eager", "naive composition under torch.compile(backend='aot_eager')", True,
                 _make_build_compiled("aot_eager"), _always),
        Provider("peft", "PEFT LoRA Linear + indexed stitch bias", True, _build_peft, lambda d: _peft_missing()),
        Provider("esta_torch", "esta_kernels.stitched_linear(backend='torch')", True, _make_build_esta("torch"),
                 _always),
        Provider("esta_cpu", "esta_kernels.stitched_linear(backend='cpu')", True, _make_build_esta("cpu"),
                 _esta_unavailable("cpu", "cpu")),
        Provider("esta_triton", "esta_kernels.stitched_linear(backend='triton')", True, _make_build_esta("triton"),
                 _esta_unavailable("triton", "cuda")),
        Provider("esta_cuda", "esta_kernels.stitched_linear(backend='cuda')", True, _make_build_esta("cuda"),
                 _esta_unavailable("cuda", "cuda")),
        Provider("esta_triton_fused_xa", "esta triton, ESTA_TRITON_XA=fused (xa in the Hopper main loop)", True,
                 _make_build_esta_env("triton", {"ESTA_TRITON_XA": "fused"}), _hopper_only),
        Provider("esta_triton_thin_g", "esta triton, ESTA_TRITON_G=thin (g by its own launch before dx)", True,
                 _make_build_esta_env("triton", {"ESTA_TRITON_G": "thin"}), _hopper_only),
        Provider("esta_triton_plain_gemm", "the Hopper path's persistent kernel as a plain GEMM (x W^T; dx)",
                 False, _build_plain_gemm, _hopper_only),
    )
}

# what the pytest-benchmark comparison runs on each device
CPU_BENCH_PROVIDERS = ("flinear", "naive", "peft", "esta_cpu")
CUDA_BENCH_PROVIDERS = ("flinear", "naive", "peft", "esta_triton", "esta_cuda")
# what bench/gpu_bench.py runs (esta before the compiled baseline, whose compile time can use up the budget)
GPU_SCRIPT_PROVIDERS = ("flinear", "naive", "cublas_accumulate", "esta_triton", "esta_cuda", "esta_triton_fused_xa",
                        "esta_triton_plain_gemm", "naive_compile_max_autotune", "esta_triton_thin_g")
DRY_RUN_PROVIDERS = ("flinear", "naive", "cublas_accumulate", "esta_torch", "esta_cpu", "naive_compile_aot_eager")


# ------------------------------------------------------------------------------------ measuring helpers
def _storage_key(t: torch.Tensor):
    try:
        s = t.untyped_storage()
        return (str(t.device), s.data_ptr()), s.nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor without a plain storage: count it by itself
        return ("id", id(t)), t.numel() * t.element_size()


def saved_activation_bytes(runner: Runner) -> int:
    """Bytes the autograd graph of one forward keeps alive for backward, activations only.

    Counted: every tensor packed by torch.autograd.graph.saved_tensors_hooks during runner.forward() (what
    autograd nodes and custom autograd functions save with save_for_backward), each distinct storage once,
    at its storage's full size (a saved view keeps its whole storage alive).
    Not counted: storages of the module-owned leaf tensors (`runner.leaves`: the frozen weight and bias,
    the LoRA factors, the stitch bias), which exist whether or not anything is saved; and whatever a
    provider keeps on its autograd ctx as plain attributes instead of save_for_backward (none of ours do).
    So x itself counts when saved (it is the layer's input activation), as do the ids and the (M, r)
    LoRA intermediate.
    """
    leaf_keys = {_storage_key(t)[0] for t in runner.leaves}
    seen: dict = {}
    keep = []  # hold the packed tensors so no storage address is reused while we count

    def pack(t):
        key, nbytes = _storage_key(t)
        if key not in leaf_keys:
            seen.setdefault(key, nbytes)
        keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = runner.forward()
    del y
    keep.clear()
    return int(sum(seen.values()))


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (0 when both are 0)."""
    got, ref = got.detach().to(ref.dtype), ref.detach()
    denom = ref.abs().max().item() if ref.numel() else 0.0
    diff = (got - ref).abs().max().item() if ref.numel() else 0.0
    return diff / denom if denom > 0 else diff


def reference_outputs(inp: Inputs, ref_dtype=torch.float64, lora: bool = True) -> dict:
    """y and the gradients of x, lora_a, lora_b, stitch_bias, from the torch reference in ref_dtype."""
    def up(t, grad=False):
        if t is None:
            return None
        return t.detach().to(ref_dtype).requires_grad_(grad)

    x = up(inp.x, True)
    if lora:
        a, b, sb = up(inp.lora_a, True), up(inp.lora_b, True), up(inp.stitch_bias, True)
        y = torch_stitched_linear(x, up(inp.weight), up(inp.bias), a, b, sb, inp.stitch_ids, scale=inp.scale)
    else:
        y = F.linear(x, up(inp.weight), up(inp.bias))
    y.backward(inp.grad_y.to(ref_dtype))
    out = {"y": y.detach(), "x": x.grad}
    if lora:
        out.update(lora_a=a.grad, lora_b=b.grad, stitch_bias=sb.grad)
    return out


def check_against_reference(runner: Runner, ref: dict, backward: bool) -> dict:
    """Relative errors of y (and, with backward, of each gradient) against `reference_outputs`."""
    errs = {}
    # with grad enabled, as timed: a compiled provider then builds the same graph it is timed with
    errs["y"] = _rel_err(runner.forward(), ref["y"])
    if backward:
        runner.fwd_bwd()
        for name, t in runner.grads.items():
            if name in ref:
                errs["d" + name] = _rel_err(t.grad, ref[name])
        runner.zero_grad()
    return errs


def tolerance(dtype: torch.dtype, device_type: str) -> float:
    """Bound on the relative errors above: bf16/fp16 round y and the gradients; CUDA float32 may use TF32."""
    if dtype == torch.bfloat16:
        return 3e-2
    if dtype == torch.float16:
        return 1e-2
    return 5e-3 if device_type == "cuda" else 1e-4
