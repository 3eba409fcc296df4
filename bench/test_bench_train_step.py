"""pytest-benchmark of one ESTA training step (Trainer.train_step), fused StitchedLinears against backend="torch".

    python -m pytest bench/test_bench_train_step.py          # two tiny ViTs, batch 4: ~5 s
    python -m bench.train_step                               # the ViT-S + ViT-B measurement (minutes)

Both providers share one model and Trainer (bench.train_step) and time the same sequence of steps: the
Trainer's step counter and sampler state are saved before each step of a reference sequence and restored
before the matching round, so round i trains the same sampled stitch on the same batch under either provider.
Before timing, the fused provider's logits and gradients are checked against backend="torch". extra_info
holds the step's peak memory (CPU: torch.profiler's allocator records, see bench/train_step.py), the
saved-for-backward bytes per forward graph and the stitches timed.

Environment: ESTA_BENCH_ROUNDS (default 6), ESTA_TRAIN_STEP_MODEL (default tiny; vit_s_b, vit_ti_s_b),
ESTA_TRAIN_STEP_BATCH (default 4).
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("timm")

from bench import train_step  # noqa: E402

ROUNDS = int(os.environ.get("ESTA_BENCH_ROUNDS", "6"))
MODEL = os.environ.get("ESTA_TRAIN_STEP_MODEL", "tiny")
BATCH = int(os.environ.get("ESTA_TRAIN_STEP_BATCH", "4"))
DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def setup():
    """The model, its Trainer, the paired-step runner and the snapshots of the sequence every provider times."""
    if train_step.resolved_backend("fused", DEVICE) == "torch":
        pytest.skip("the fused provider resolves to backend 'torch' here (no compiled CPU kernels, or ESTA_BACKEND)")
    model = train_step.build_model(MODEL)
    data = train_step.make_dataset(MODEL, 2 * BATCH)
    trainer = train_step.make_trainer(model, data, batch=BATCH, device=DEVICE, bf16=False)
    runner = train_step.PairedSteps(trainer, DEVICE)
    runner.pair(train_step.PROVIDERS)  # warm-up; creates AdamW's state
    stitch = next(s.id for s in model.stitches if not s.is_anchor)
    check = train_step.check_providers(model, data, batch=min(2, BATCH), device=DEVICE, bf16=False, stitch=stitch)
    snaps = []
    for _ in range(ROUNDS):  # the reference sequence: one state per round
        snaps.append(runner.snapshot())
        runner.step("fused")
    return {"model": model, "runner": runner, "snaps": snaps, "check": check}


@pytest.mark.parametrize("provider", train_step.PROVIDERS)
def test_train_step(benchmark, setup, provider):
    check = setup["check"]
    tol = train_step.tolerance(False, DEVICE)
    assert max(check["logits_rel_err"], check["grads_rel_err"]) <= tol, \
        f"fused disagrees with backend='torch' ({check}, tolerance {tol})"
    runner, snaps = setup["runner"], setup["snaps"]

    runner.restore(snaps[0])
    memory = runner.memory_step(provider)  # untimed: the profiled step

    rounds = iter(range(10**9))
    stitches = []

    def restore():
        runner.restore(snaps[next(rounds) % len(snaps)])
        return (), {}

    def step():
        stitches.append(runner.step(provider)["stitch"])

    benchmark.group = f"train_step {MODEL} batch {BATCH} {DEVICE.type}"
    benchmark.extra_info.update(
        model=MODEL, batch=BATCH, device=DEVICE.type, provider=provider,
        backend=train_step.resolved_backend(provider, DEVICE), threads=torch.get_num_threads(),
        peak_bytes=memory["peak_bytes"], step_peak_bytes=memory["step_peak_bytes"], base_bytes=memory["base_bytes"],
        saved_bytes=memory["saved_bytes"], saved_bytes_per_graph=memory["saved_bytes_per_graph"],
        memory_method="torch.profiler profile_memory: peak live CPU allocator bytes above the step's start "
                      "(step_peak_bytes), plus parameters, buffers and optimizer state (peak_bytes)",
        check=check,
    )
    benchmark.pedantic(step, setup=restore, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["stitches"] = stitches
    # both providers cycle through the same snapshots in the same order, so they train the same stitches
    done = setup.setdefault("stitches", {})
    done[provider] = stitches
    if len(done) == len(train_step.PROVIDERS):
        first, second = (done[p] for p in train_step.PROVIDERS)
        assert first == second, f"the providers trained different stitches: {done}"
