"""pytest-benchmark comparison of the least-squares stitching init on the CPU (float32 activations).

    python -m pytest bench/test_bench_lstsq.py                       # tables; -s prints the summary lines

Shapes: 100 images x 197 tokens = 19,700 tokens, ViT-Ti -> ViT-S (192 -> 384) and ViT-S -> ViT-B
(384 -> 768). Activations: h_in ~ N(0.5, 1) per feature, h_out = h_in @ W.T + b + 0.1 N(0, 1).
Providers (baselines from esta_kernels.reference, shared with the tests):
    pinv            SN-Net's method: torch.linalg.pinv of [H_in, 1] over all tokens, then pinv @ H_out
    gram_cholesky   plain torch: float64 Gram of [H_in, 1] and one Cholesky solve
    esta_cpu        esta_kernels.StreamingLstsq(backend="cpu"), streamed in batches of 197 * 10 tokens,
                    then solve()
extra_info: the median time of pinv and the ratio pinv / provider (pinv runs first in each group), and
max |dW|, max |db| against pinv's solution and against a float64 numpy-free reference (float64 Gram +
Cholesky).

test_streamed_1m_tokens: 500 batches of 2000 tokens (384 -> 768) generated on the fly, fed to
StreamingLstsq(backend="cpu") in a fresh subprocess. Reports the wall time (with generation) and the update and
solve times, and memory as the process's resident set (/proc/self/statm) after a warm-up batch (update +
solve: rss_start_mib) and its maximum sampled after every update while that batch is alive (rss_max_mib);
rss_growth_mib is their difference, i.e. what a million tokens needed beyond one batch, and
rss_max_first_tenth_mib the maximum over the first 10% of the batches: equal to rss_max_mib when memory does not
grow with the tokens (allocator caches account for the growth over one batch). The sampling can miss a
transient peak inside update() (the kernel's block buffers, ~1024 x (in + 1 + out) x 4 bytes plus a
128-row GEMM result, freed before it returns). The state (float64 gram and cross) is reported as state_mib. The pinv method
would need the 1M x 385 float32 matrix alone (1.5 GB), plus its SVD workspace.

Environment: ESTA_BENCH_ROUNDS (default 5), ESTA_BENCH_WARMUP (default 1).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import esta_kernels
from esta_kernels.reference import gram_cholesky_lstsq, pinv_lstsq

ROUNDS = int(os.environ.get("ESTA_BENCH_ROUNDS", "5"))
WARMUP = int(os.environ.get("ESTA_BENCH_WARMUP", "1"))
BATCH_TOKENS = 197 * 10

SHAPES = {"vit_ti_s": (19700, 192, 384), "vit_s_b": (19700, 384, 768)}
PROVIDERS = ["pinv", "gram_cholesky", "esta_cpu"]

_data: dict = {}
_pinv: dict = {}  # shape -> (median seconds, W, b)


def _inputs(shape):
    if shape not in _data:
        _data.clear()
        n, d_in, d_out = SHAPES[shape]
        g = torch.Generator().manual_seed(0)
        h_in = torch.randn(n, d_in, generator=g) + 0.5
        w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
        h_out = h_in @ w.t() + torch.randn(d_out, generator=g) + 0.1 * torch.randn(n, d_out, generator=g)
        ref_w, ref_b = gram_cholesky_lstsq(h_in, h_out)  # float64: the accuracy yardstick
        _data[shape] = (h_in, h_out, ref_w, ref_b)
    return _data[shape]


def _esta_cpu(h_in, h_out):
    solver = esta_kernels.StreamingLstsq(h_in.shape[1], h_out.shape[1], backend="cpu")
    for lo in range(0, h_in.shape[0], BATCH_TOKENS):
        solver.update(h_in[lo:lo + BATCH_TOKENS], h_out[lo:lo + BATCH_TOKENS])
    return solver.solve()


FUNCS = {"pinv": pinv_lstsq, "gram_cholesky": gram_cholesky_lstsq, "esta_cpu": _esta_cpu}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_lstsq_init(benchmark, shape, provider):
    if provider == "esta_cpu" and "cpu" not in esta_kernels.available_backends():
        pytest.skip("the cpu backend needs the compiled extension")
    h_in, h_out, ref_w, ref_b = _inputs(shape)
    fn = FUNCS[provider]
    w, b = fn(h_in, h_out)
    info = {
        "shape": dict(zip(("tokens", "d_in", "d_out"), SHAPES[shape])),
        "provider": provider,
        "threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
        "max_abs_dW_vs_f64": float((w.double() - ref_w).abs().max()),
        "max_abs_db_vs_f64": float((b.double() - ref_b).abs().max()),
    }
    if provider != "pinv" and shape in _pinv:
        pw, pb = _pinv[shape][1:]
        info["max_abs_dW_vs_pinv"] = float((w.double() - pw.double()).abs().max())
        info["max_abs_db_vs_pinv"] = float((b.double() - pb.double()).abs().max())
    benchmark.group = f"lstsq cpu {shape}"
    benchmark.extra_info.update(info)
    benchmark.pedantic(fn, args=(h_in, h_out), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    median = benchmark.stats.stats.median
    if provider == "pinv":
        _pinv[shape] = (median, w, b)
    elif shape in _pinv:
        benchmark.extra_info["pinv_median_s"] = _pinv[shape][0]
        benchmark.extra_info["speedup_vs_pinv"] = _pinv[shape][0] / median
    print(f"\n{shape} {provider}: median {median * 1e3:.1f} ms "
          + " ".join(f"{k}={v:.3g}" for k, v in benchmark.extra_info.items() if isinstance(v, float)))
    assert info["max_abs_dW_vs_f64"] <= 1e-4, f"{provider}: W off the float64 solution"


_STREAM_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import torch
    import esta_kernels
    n_batches, rows, d_in, d_out = map(int, sys.argv[1:5])
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5

    def batch():
        x = torch.randn(rows, d_in, generator=g) + 0.5
        return x, x @ w.t() + 0.1 * torch.randn(rows, d_out, generator=g)

    page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20

    def rss_mib():  # current resident set (Linux /proc), not the high-water mark
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page_mib

    warm = esta_kernels.StreamingLstsq(d_in, d_out, backend="cpu")
    warm.update(*batch()); warm.solve()
    del warm
    rss_start = rss_mib()
    t0 = time.perf_counter()
    solver = esta_kernels.StreamingLstsq(d_in, d_out, backend="cpu")
    t_acc, rss_max, rss_first_tenth = 0.0, rss_start, None
    for i in range(n_batches):
        if i == n_batches // 10:
            rss_first_tenth = rss_max
        x, y = batch()
        t1 = time.perf_counter()
        solver.update(x, y)
        t_acc += time.perf_counter() - t1
        rss_max = max(rss_max, rss_mib())  # sampled with the batch still alive
    t1 = time.perf_counter()
    wt, bt = solver.solve()
    t_solve = time.perf_counter() - t1
    total = time.perf_counter() - t0
    st = solver.stats
    state = sum(t.numel() * t.element_size() for t in (st.mean_in, st.mean_out, st.sxx, st.sxy, st.noise_diag))
    print(json.dumps(dict(tokens=solver.num_tokens, total_s=total, update_s=t_acc, solve_s=t_solve,
                          rss_start_mib=rss_start, rss_max_mib=rss_max, rss_growth_mib=rss_max - rss_start,
                          rss_max_first_tenth_mib=rss_first_tenth,
                          state_mib=state / 2**20,
                          batch_mib=rows * (d_in + d_out) * 4 / 2**20,
                          max_abs_dW_vs_truth=float((wt - w).abs().max()))))
""")


def test_streamed_1m_tokens(benchmark):
    if "cpu" not in esta_kernels.available_backends():
        pytest.skip("the cpu backend needs the compiled extension")
    args = ["500", "2000", "384", "768"]
    result = {}

    def run():
        out = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, *args], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.group = "lstsq cpu streamed 1M tokens"
    benchmark.pedantic(run, rounds=1, iterations=1)
    result["load_avg_1m"] = os.getloadavg()[0]
    benchmark.extra_info.update(result)
    print("\nstreamed 1M tokens:", json.dumps(result))
    assert result["tokens"] == 1_000_000
    assert result["max_abs_dW_vs_truth"] < 1e-2  # the noise's own estimation error, ~0.1 / sqrt(1e6) per entry
