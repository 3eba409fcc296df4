#!/usr/bin/env python3
"""Reproduces the rank-1 illegal address of the H100 probe (2026-11-27) with the Triton kernels as they were
before issue 13 (bench/repro/pre13_stitched_linear.py, a verbatim copy of that module), to name the kernel
that faulted. Run under compute-sanitizer by bench/gpu_check.sh:

    compute-sanitizer --tool memcheck python3 bench/repro/r1_crash.py [--dtype float16] [--padded]

The probe's test (tests/kernels/test_triton_stitched_linear.py::test_matches_reference, r = 1, M = 7, K = 37, N = 45,
float16) ran forward then backward; its (M, 1) float32 intermediates were contiguous, so both of their
strides were 1. Without --padded those buffers are made that way again (the module's later workaround,
_rank_buffer's 16-element row stride, is undone); with --padded the workaround stays. Each launch is
announced, then synchronized: the last `launch` line without its `done` line names the faulting kernel, and
memcheck's report names the access.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--padded", action="store_true", help="keep the pre-13 workaround (padded rank buffers)")
    ap.add_argument("--M", type=int, default=7)
    args = ap.parse_args(argv)
    os.environ.setdefault("ESTA_TRITON_AUTOTUNE", "0")
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"status": "skipped", "reason": "no CUDA device"}))
        return 0
    spec = importlib.util.spec_from_file_location("pre13_stitched_linear",
                                                  os.path.join(HERE, "pre13_stitched_linear.py"))
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    if not args.padded:
        old._rank_buffer = lambda M, r, device: torch.empty((M, r), dtype=torch.float32, device=device)
    launch = old._launch

    def traced(plan, device):
        strides = {k: v for k, v in plan.args.items() if k.startswith("stride")}
        print(json.dumps({"launch": plan.role, "tune": plan.tune, "strides": strides}), flush=True)
        launch(plan, device)
        torch.cuda.synchronize()
        print(json.dumps({"done": plan.role}), flush=True)

    old._launch = traced
    dt = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    M, K, N, r, S = args.M, 37, 45, 1, 5

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dt).cuda()

    x, w, b = rnd(M, K), rnd(N, K, s=K ** -0.5), rnd(N)
    a, bb, sb = rnd(r, K, s=K ** -0.5), rnd(N, r), rnd(S, N)
    ids = torch.randint(-1, S, (M,), generator=g).cuda()
    y, xa = old.triton_stitched_linear_forward(x, w, b, a, bb, sb, ids, 0.75)
    print(json.dumps({"xa_strides": list(xa.stride())}), flush=True)
    dy = rnd(M, N)
    old.triton_stitched_linear_backward(dy, x, w, a, bb, xa, ids, S, 0.75, [True] * 4)
    torch.cuda.synchronize()
    print(json.dumps({"status": "ok"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
