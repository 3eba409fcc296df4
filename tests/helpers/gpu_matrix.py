"""The GPU correctness matrix of the Triton backend, one group per process (tests/kernels/test_gpu_matrix.py
runs it), from the repository root:

    python -m tests.helpers.gpu_matrix --path tma --dtype bfloat16 [--r 1,2 --M 7 --ids rows] [--json-out FILE]

A group is one GEMM path (`tma`: the Hopper path, forced with ESTA_TRITON_ARCH=90; `pointer`: the pointer
kernel, ESTA_TRITON_ARCH=80) and one dtype. It runs r in {1, 2, 3, 8, 16, 256} x M in {1, 7, 130, 4099} x ids
in {none, int, rows (per-row ids with -1s)}: forward and backward through the custom ops against the float64
torch reference (esta_kernels.torch_stitched_linear; low-precision results judged against PyTorch's own
error in that dtype, as tests/kernels/test_triton_stitched_linear.py does), outputs poisoned with NaN first. One JSON line
per case on stdout. A CUDA error is sticky for the process, so the group stops at the first one and reports
it as `fault`: the other groups (their own processes) still run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

RANKS = (1, 2, 3, 8, 16, 256)
ROWS = (1, 7, 130, 4099)
IDS = ("none", "int", "rows")
# (K, N) per path: TMA-legal widths on the Hopper path, odd ones (K = 37) on the pointer path
SHAPES = {"tma": (72, 104), "pointer": (37, 45)}
EPS = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
S = 5
SCALE = 0.5


def run_case(path: str, dtype_name: str, r: int, M: int, ids: str, device: str = "cuda") -> dict:
    import torch
    import torch.utils.deterministic as det

    import esta_kernels
    from tests.helpers.inputs import grads_of, lowp_error, make_inputs, reference, reference_grads
    from esta_kernels import _ops
    from esta_kernels.triton import stitched_linear as sl

    dtype = getattr(torch, dtype_name)
    K, N = SHAPES[path]
    inp = make_inputs(M, K, N, r, S, dtype=dtype, device=device, ids=ids, param_dtype=torch.float32)
    if ids == "rows":
        inp["stitch_ids"][0] = -1
    x, w, b, a, bb, sb = (inp[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "stitch_bias"))
    sid = inp["stitch_ids"]
    if isinstance(sid, int):
        sid = torch.full((1,), sid, dtype=torch.int64, device=device)
    elif sid is not None:
        sid = sid.reshape(-1)
    plan = sl.plan_forward(x, w, b, a, bb, sb if sid is not None else None, sid, SCALE,
                           arch=sl._arch(x.device, device == "cpu"), interpreter=device == "cpu")
    det.fill_uninitialized_memory = True  # outputs start as NaN: an unwritten element fails
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        y, xa = _ops.FORWARD_OPS["triton"](x, w, b, a, bb, sb if sid is not None else None, sid, SCALE)
        grad_y = torch.randn(M, N, dtype=torch.float64, device=device).to(dtype)
        grads = _ops.BACKWARD_OPS["triton"](grad_y, x, w, a, bb, xa, sid if sid is not None else None,
                                            S if sid is not None else 0, SCALE, [True] * 4)
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        torch.use_deterministic_algorithms(False)
        det.fill_uninitialized_memory = False
    ref_inp = dict(inp) if sid is not None else {**inp, "stitch_ids": None}
    ref = reference(ref_inp, SCALE)
    ref_g = reference_grads(ref_inp, SCALE, grad_y)
    low = dtype != torch.float32
    lowp = lowp_error(ref_inp, SCALE, ref) if low else 0.0
    out_rel = 4 * EPS[dtype_name] + (2.0 ** -10 if not low and torch.backends.cuda.matmul.allow_tf32 else 1e-6)
    acc_rel = 4 * EPS[dtype_name] if low else 1e-5
    errors = {}

    def check(name, got, want, rel, lowp_err=0.0):
        if not torch.isfinite(got).all():
            errors[name] = "non-finite (unwritten?)"
            return
        if got.numel() == 0:
            return
        err = (got.double() - want).abs().max().item()
        bound = rel * (1 + want.abs().max().item()) + 3 * lowp_err
        if err > bound:
            errors[name] = f"max error {err:.3g} > {bound:.3g}"

    check("y", y, ref, out_rel, lowp)
    check("xa", xa, x.double() @ a.double().t(), acc_rel)
    dx, da, db, ds = grads
    # gradients: within PyTorch's own error for the unfused composition in this dtype
    naive_g = grads_of(esta_kernels.naive_stitched_linear, ref_inp, SCALE, grad_y, lambda t: t.clone()) if low else {}

    def lowp_of(name):
        return (naive_g[name].double() - ref_g[name]).abs().max().item() if name in naive_g else 0.0

    check("dx", dx, ref_g["x"], out_rel + acc_rel, lowp_of("x"))
    check("d lora_a", da, ref_g["lora_a"], 4 * acc_rel, lowp_of("lora_a"))
    check("d lora_b", db, ref_g["lora_b"], 4 * acc_rel, lowp_of("lora_b"))
    if sid is not None:
        check("d stitch_bias", ds, ref_g["stitch_bias"], 4 * acc_rel, lowp_of("stitch_bias"))
    return dict(status="ok" if not errors else "mismatch", plan_path=plan.path, errors=errors)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", required=True, choices=("tma", "pointer"))
    ap.add_argument("--dtype", required=True, choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--r", default=",".join(map(str, RANKS)))
    ap.add_argument("--M", default=",".join(map(str, ROWS)))
    ap.add_argument("--ids", default=",".join(IDS))
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a smoke run of this harness in Triton's interpreter (sets TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["ESTA_TRITON_ARCH"] = "90" if args.path == "tma" else "80"
    os.environ.setdefault("ESTA_TRITON_AUTOTUNE", "0")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"status": "skipped", "reason": "no CUDA device"}))
        return 0
    if args.device == "cuda" and args.path == "tma" and torch.cuda.get_device_capability() != (9, 0):
        print(json.dumps({"status": "skipped", "reason": "the Hopper path needs sm_90"}))
        return 0
    failed = 0
    for r in (int(v) for v in args.r.split(",")):
        for M in (int(v) for v in args.M.split(",")):
            for ids in args.ids.split(","):
                case = dict(path=args.path, dtype=args.dtype, r=r, M=M, ids=ids)
                t0 = time.time()
                try:
                    case.update(run_case(args.path, args.dtype, r, M, ids, args.device))
                except Exception as exc:
                    text = f"{type(exc).__name__}: {exc}"
                    # a CUDA error poisons the context: report it and stop this group's process
                    cuda_fault = "CUDA" in text or "cuda" in type(exc).__name__.lower() or "illegal" in text
                    case.update(status="fault" if cuda_fault else "error", error=text[:1500],
                                traceback=traceback.format_exc()[-1500:])
                case["seconds"] = round(time.time() - t0, 2)
                print(json.dumps(case), flush=True)
                if case["status"] != "ok":
                    failed += 1
                if case["status"] == "fault":
                    print(json.dumps({"status": "stopped", "reason": "CUDA fault; later cases of this group not run"}),
                          flush=True)
                    return 3
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
