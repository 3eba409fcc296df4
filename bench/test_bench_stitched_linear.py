"""pytest-benchmark comparison of the stitched linear: one group per device, shape and mode.

    python -m pytest bench/test_bench_stitched_linear.py            # the raw pytest-benchmark tables
    python -m bench.compare                                         # one run, printed as medians and ratios

Modes: `fwd` (a training-mode forward: x and the LoRA/stitch parameters require grad, so autograd saves
what backward needs) and `fwd_bwd` (that forward plus y.backward(grad_y)). On the CPU everything is
float32; where CUDA exists the same groups run on the GPU in bfloat16.
Before timing, each provider's y (and, for fwd_bwd, its gradients) is checked against the float64 torch
reference: a wrong kernel fails instead of being timed. extra_info records saved_bytes (see
bench.providers.saved_activation_bytes), the FLOP count and the relative errors.

Environment: ESTA_BENCH_ROUNDS (default 15), ESTA_BENCH_WARMUP (default 3), ESTA_BENCH_QUICK=1 (tiny
shapes: a smoke run of the harness, not a measurement).
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.providers import (
    CPU_BENCH_PROVIDERS,
    CUDA_BENCH_PROVIDERS,
    PROVIDERS,
    check_against_reference,
    reference_outputs,
    saved_activation_bytes,
    tolerance,
)
from bench.shapes import cpu_shapes, make_inputs

ROUNDS = int(os.environ.get("ESTA_BENCH_ROUNDS", "15"))
WARMUP = int(os.environ.get("ESTA_BENCH_WARMUP", "3"))
MODES = ("fwd", "fwd_bwd")
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}

CASES = [("cpu", p) for p in CPU_BENCH_PROVIDERS]
if torch.cuda.is_available():
    CASES += [("cuda", p) for p in CUDA_BENCH_PROVIDERS]

_inputs: dict = {}
_refs: dict = {}


def _inputs_for(shape, device):
    key = (shape.name, device)
    if key not in _inputs:
        _inputs.clear()  # one shape's tensors at a time: the LLaMA shape alone holds ~100 MB
        _refs.clear()
        inp = make_inputs(shape, dtype=DTYPES[device], device=device, seed=0)
        inp.set_requires_grad(True)
        _inputs[key] = inp
    return _inputs[key]


def _reference_for(shape, device, lora):
    key = (shape.name, device, lora)
    if key not in _refs:
        _refs[key] = reference_outputs(_inputs_for(shape, device), torch.float64, lora=lora)
    return _refs[key]


@pytest.mark.parametrize("device,provider_name", CASES, ids=[f"{d}-{p}" for d, p in CASES])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", cpu_shapes(), ids=lambda s: s.name)
def test_stitched_linear(benchmark, shape, mode, device, provider_name):
    provider = PROVIDERS[provider_name]
    reason = provider.unavailable(device)
    if reason:
        pytest.skip(reason)
    inp = _inputs_for(shape, device)
    runner = provider.build(inp)
    backward = mode == "fwd_bwd"

    errs = {}
    if provider.computes_lora:
        errs = check_against_reference(runner, _reference_for(shape, device, True), backward)
        tol = tolerance(inp.x.dtype, device)
        bad = {k: v for k, v in errs.items() if not v <= tol}
        assert not bad, f"{provider_name} disagrees with the float64 reference (relative errors {bad}, tolerance {tol})"

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if backward:
        def fn():
            runner.fwd_bwd()
            sync()
    else:
        def fn():
            runner.forward()
            sync()

    flops = shape.forward_flops(provider.computes_lora)
    if backward:
        flops += shape.backward_flops(provider.computes_lora)
    benchmark.group = f"{device} {shape.name} {mode}"
    benchmark.extra_info.update(
        shape=shape.as_dict(),
        mode=mode,
        device=device,
        dtype=str(inp.x.dtype).replace("torch.", ""),
        provider=provider_name,
        description=provider.description,
        flops=flops,
        saved_bytes=saved_activation_bytes(runner),
        rel_errors=errs,
    )
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    runner.zero_grad()
