"""Static report of the kernels the stitched linear launches, without a GPU.

    python -m esta_kernels.inspect [--arch 90] [--json] [--dtype bfloat16] [--params fp32|same]
                                   [--shapes llama7b_q_proj,vit_b_qkv] [--all-configs]
                                   [--xa thin|fused] [--g fused|thin]

For each shape of esta_kernels/shapes.py (GPU_SHAPES, the GPU benchmark's), the forward's
and the backward's launches are planned on meta tensors exactly as the op plans them on a GPU of the given
arch (esta_kernels.triton.stitched_linear.plan_forward / plan_backward), each kernel is compiled by
triton.compile for GPUTarget("cuda", arch, 32) with its first autotune configuration (every one with
--all-configs), and the report gives per launch:
    wgmma      the PTX issues wgmma.mma_async (Hopper tensor cores; mma.sync is the Ampere path)
    tma        the PTX issues cp.async.bulk.tensor (TMA loads or stores)
    ws         the PTX has setmaxnreg (warp-specialized: producer/consumer warp groups)
    regs, spill_stores, spill_loads, stack   from `ptxas -v` (the ptxas in the triton wheel) on that PTX
    smem       shared memory bytes (the compiler's metadata)
When the package has esta_kernels/_cuda_report.py (the CUDA backend's own report), its
cuda_kernel_report(arch) rows are listed too.

Compilation runs in this process with the interpreter off: run it as a module (the tests start it in a
subprocess), not under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

_TYPES = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64",
          "int32": "i32"}


# ----------------------------------------------------------------------------------------- shapes
def bench_shapes():
    """The GPU benchmark's shapes (esta_kernels.shapes.GPU_SHAPES)."""
    from esta_kernels.shapes import GPU_SHAPES

    return GPU_SHAPES


# ---------------------------------------------------------------------------------------- launches
def op_launches(shape, dtype_name: str = "bfloat16", params: str = "fp32", arch: int = 90,
                num_sms: int = 132, mode: str = "thin", g_mode: str = "fused"):
    """[(label, Launch)] of one forward and one backward of the op at `shape` (all features on: bias if the
    shape has one, LoRA, per-row ids), planned on meta tensors for `arch`."""
    import torch

    from esta_kernels.triton import stitched_linear as sl

    dt = getattr(torch, dtype_name)
    pdt = torch.float32 if params == "fp32" else dt
    M, K, N, r, S = shape.M, shape.K, shape.N, shape.r, shape.S

    def mk(*size, dtype=dt):
        return torch.empty(*size, dtype=dtype, device="meta")

    x, w, dy = mk(M, K), mk(N, K), mk(M, N)
    b = mk(N) if shape.bias else None
    a, bb, sb = mk(r, K, dtype=pdt), mk(N, r, dtype=pdt), mk(S, N, dtype=pdt)
    ids = mk(M, dtype=torch.int64)
    fwd = sl.plan_forward(x, w, b, a, bb, sb, ids, 2.0, arch=arch, num_sms=num_sms, mode=mode)
    bwd = sl.plan_backward(dy, x, w, a, bb, fwd.xa, ids, S, 2.0, [True] * 4, arch=arch, num_sms=num_sms,
                           mode=g_mode)
    return ([(f"fwd-{name}", launch, fwd.path) for name, launch in fwd.launches]
            + [(f"bwd-{name}", launch, bwd.path) for name, launch in bwd.launches])


def kernel_of(launch):
    from esta_kernels.triton import stitched_linear as sl

    return sl._KERNELS[launch.role]


def configs_of(launch, arch: int):
    from esta_kernels.triton import stitched_linear as sl
    from esta_kernels.triton._common import arch_family

    return sl.autotune_configs(launch.role, arch_family(arch // 10), launch.tune)


def ast_source(kernel, args: Dict, meta: Dict):
    """ASTSource of one launch + config, specialized the way triton's launcher does it (pointers and ints
    that are multiples of 16 marked divisible by 16, ints equal to 1 made constants, do_not_specialize
    honoured); portable across the triton 3.6-3.9 ASTSource API."""
    import torch
    from triton.compiler import ASTSource

    unspecialized = {p.name for p in kernel.params if p.do_not_specialize}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = meta[name] if name in meta else args[name]
        plain_int = isinstance(value, int) and not isinstance(value, bool)
        if name in unspecialized and plain_int:
            signature[name] = "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
        elif name in meta or value is None or (plain_int and value == 1):
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[str(value.dtype).replace("torch.", "")]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _tool(name: str) -> Optional[str]:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def ptxas_usage(ptx: str, arch: int) -> Dict[str, Optional[int]]:
    """registers, spill stores/loads and stack bytes from `ptxas -v` (the triton wheel's ptxas)."""
    out = dict(regs=None, spill_stores=None, spill_loads=None, stack=None)
    ptxas = _tool("ptxas")
    if ptxas is None:
        return out
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["regs"] = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out["stack"], out["spill_stores"], out["spill_loads"] = (int(v) for v in m.groups())
    return out


def compile_launch(launch, config, arch: int) -> Dict:
    """Compiles one launch with one config for `arch`; a record of what the code uses."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = kernel_of(launch)
    meta = {**launch.meta, **config.kwargs}
    t0 = time.time()
    rec = dict(kernel=kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, role=launch.role,
               tune=launch.tune, config=str(config), num_warps=config.num_warps, num_stages=config.num_stages)
    try:
        compiled = triton.compile(ast_source(kernel, launch.args, meta), target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        ptx = compiled.asm.get("ptx", "")
        rec.update(ok=True, wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
                   tma="cp.async.bulk.tensor" in ptx, ws="setmaxnreg" in ptx,
                   smem=int(compiled.metadata.shared), ptx_bytes=len(ptx), **ptxas_usage(ptx, arch))
    except Exception as e:  # reported, with the config that failed
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


def report(arch: int = 90, dtype_name: str = "bfloat16", params: str = "fp32", shape_names=None,
           all_configs: bool = False, mode: str = "thin", log=None, g_mode: str = "fused") -> Dict:
    """The whole report as a dict: versions, one record per (shape, launch, config), CUDA rows."""
    import triton

    rows: List[Dict] = []
    shapes = [s for s in bench_shapes() if not shape_names or s.name in shape_names]
    for shape in shapes:
        for label, launch, path in op_launches(shape, dtype_name, params, arch, mode=mode, g_mode=g_mode):
            configs = configs_of(launch, arch)
            for i, config in enumerate(configs if all_configs else configs[:1]):
                rec = dict(shape=shape.name, launch=label, path=path, config_index=i,
                           **compile_launch(launch, config, arch))
                rows.append(rec)
                if log:
                    log(format_row(rec))
    cuda_rows = None
    try:
        from esta_kernels import _cuda_report  # the CUDA backend's own report, when present
    except ImportError:
        _cuda_report = None
    if _cuda_report is not None:
        try:
            cuda_rows = _cuda_report.cuda_kernel_report(arch)
        except Exception as e:
            cuda_rows = [{"error": f"{type(e).__name__}: {e}"}]
    return dict(arch=arch, dtype=dtype_name, params=params, xa_mode=mode, g_mode=g_mode, triton=triton.__version__,
                ptxas=_ptxas_version(), rows=rows, cuda=cuda_rows)


def _ptxas_version() -> Optional[str]:
    ptxas = _tool("ptxas")
    if ptxas is None:
        return None
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else None


HEADER = (f"{'shape':<18}{'launch':<22}{'kernel':<26}{'cfg':>4}{'wgmma':>6}{'tma':>5}{'ws':>4}{'regs':>6}"
          f"{'spill':>7}{'smem':>8}  config")


def _yn(v) -> str:
    return "-" if v is None else ("yes" if v else "no")


def format_row(r: Dict) -> str:
    if not r.get("ok"):
        return f"{r['shape']:<18}{r['launch']:<22}{r['kernel']:<26}{r['config_index']:>4}  FAILED {r['error'][:200]}"
    spill = None if r["spill_stores"] is None else r["spill_stores"] + r["spill_loads"]
    cfg = re.sub(r", (num_ctas|maxnreg|ir_override|minRegAutoWS|maxRegAutoWS|pingpongAutoWS)[^,]*", "", r["config"])
    return (f"{r['shape']:<18}{r['launch']:<22}{r['kernel']:<26}{r['config_index']:>4}{_yn(r['wgmma']):>6}"
            f"{_yn(r['tma']):>5}{_yn(r['ws']):>4}{str(r['regs']):>6}{str(spill):>7}{r['smem']:>8}  {cfg}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m esta_kernels.inspect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 Hopper, 80 Ampere)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--params", default="fp32", choices=("fp32", "same"),
                    help="LoRA factors and stitch bias in float32 (master weights, the default) or x's dtype")
    ap.add_argument("--shapes", default=None, help="comma-separated GPU shape names (esta_kernels/shapes.py)")
    ap.add_argument("--all-configs", action="store_true", help="every autotune configuration, not the first")
    ap.add_argument("--xa", default="thin", choices=("thin", "fused"), help="how the forward makes xa")
    ap.add_argument("--g", default="fused", choices=("fused", "thin"),
                    help="how the backward makes g: in the dx launch (fused, the default) or its own launch")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("TRITON_INTERPRET=1 is set: the interpreter cannot compile kernels; unset it")
    names = args.shapes.split(",") if args.shapes else None
    if args.json:
        print(json.dumps(report(args.arch, args.dtype, args.params, names, args.all_configs, args.xa,
                                g_mode=args.g), indent=1))
        return 0
    import triton

    print(f"esta kernel report: sm_{args.arch}, {args.dtype} x, params {args.params}, xa {args.xa}, g {args.g}, "
          f"triton {triton.__version__}, ptxas {_ptxas_version()}")
    print(HEADER)
    rep = report(args.arch, args.dtype, args.params, names, args.all_configs, args.xa, g_mode=args.g,
                 log=lambda line: print(line, flush=True))
    if rep["cuda"] is not None:
        print("\nCUDA backend kernels (esta_kernels._cuda_report):")
        for row in rep["cuda"]:
            print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    failed = [r for r in rep["rows"] if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
