"""Compiles every Triton launch of the stitched linear and of the least-squares accumulation
(esta_kernels/triton/lstsq.py), for every autotune config, every dtype and both target GPUs (sm_80 Ampere,
sm_90 Hopper), without a GPU.

The interpreter accepts kernels the GPU compiler rejects (e.g. a tl.dot dimension below 16), so passing
the interpreter tests is not enough. Here `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))` runs the real compiler down to PTX and a cubin. The launches are built by the module's own plan
functions on meta tensors, so they are exactly what the launchers run; argument specialization (pointers
and multiples of 16 marked divisible by 16, ints equal to 1 made constants) mimics triton's launcher.

Compilation runs in subprocesses with TRITON_INTERPRET unset: under TRITON_INTERPRET=1 triton.jit returns
interpreter functions, which cannot be compiled. Two workers, a fresh Triton cache each run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("triton")

ARCHS = (80, 90)
# float32 twice: full-precision dots (torch's default) and TF32 (torch.backends.cuda.matmul.allow_tf32)
DTYPES = ("float32", "float32+tf32", "float16", "bfloat16")
# activation dtypes of the least-squares accumulation (always IEEE float32 dots, so no TF32 variant)
LSTSQ_DTYPES = ("float32", "float16", "bfloat16")
# Largest dynamic shared memory per block: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
WORKERS = 2


# ------------------------------------------------------------------------------ worker (subprocess) side
def _launches(dtype_name: str):
    """(label, Launch) of every launch of the forward and the backward with every feature on, for LoRA
    factors in x's dtype and, for 16-bit x, in float32 (master weights). LLaMA-like shapes."""
    import torch

    from esta_kernels.triton import stitched_linear as sl

    dt = getattr(torch, dtype_name.split("+")[0])
    torch.backends.cuda.matmul.allow_tf32 = dtype_name.endswith("+tf32")
    M, K, N, r, S = 8192, 4096, 4096, 16, 40

    def mk(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype, device="meta")

    x, w, b, dy = mk(M, K), mk(N, K), mk(N), mk(M, N)
    ids = mk(M, dtype=torch.int64)
    y, xa, g, dx = mk(M, N), mk(M, r, dtype=torch.float32), mk(M, r, dtype=torch.float32), mk(M, K)
    out = []
    lora_dtypes = [dt] if dt == torch.float32 else [dt, torch.float32]
    for ld in lora_dtypes:
        a, bb, sb = mk(r, K, dtype=ld), mk(N, r, dtype=ld), mk(S, N, dtype=ld)
        tag = f"{dtype_name}/lora-{str(ld).replace('torch.', '')}"
        out.append((f"{tag}/fwd-xa", sl.plan_gemm(x, a.t(), xa, thin=True, precision_dtype=dt)))
        out.append((f"{tag}/fwd-y", sl.plan_gemm(x, w.t(), y, bias=b, xa=xa, up=bb.t(), stitch_bias=sb, ids=ids,
                                                 lora_scale=2.0)))
        out.append((f"{tag}/bwd-g", sl.plan_gemm(dy, bb, g, main_scale=2.0, thin=True, precision_dtype=dt)))
        out.append((f"{tag}/bwd-dx", sl.plan_gemm(dy, w, dx, xa=g, up=a)))
    # the reductions read x, dy, xa and g only: their dtypes do not depend on the LoRA factors'
    out.append((f"{dtype_name}/bwd-dlora_b-dstitch",
                sl.plan_row_reduce(dy, xa, ids=ids, num_stitches=S, scale=2.0, precision_dtype=dt)[0]))
    out.append((f"{dtype_name}/bwd-dlora_a", sl.plan_row_reduce(g, x, precision_dtype=dt)[0]))
    return out


class _LstsqLaunch:
    """A least-squares accumulation launch in the shape the compile jobs expect (role, tune, args, meta)."""

    role, tune = "lstsq", ""

    def __init__(self, plan):
        self.args, self.meta = plan.args, plan.meta


def _lstsq_launches():
    """(label, launch) of the accumulation for each activation dtype, at ViT-S -> ViT-B (19,700 tokens,
    384 -> 768: 100 images); the shifts are float32, one row per block of rows as StreamingLstsq passes them."""
    import torch

    from esta_kernels.triton import lstsq

    out = []
    for dtype_name in LSTSQ_DTYPES:
        dt = getattr(torch, dtype_name)
        n, d_in, d_out = 19700, 384, 768
        h_in = torch.empty(n, d_in, dtype=dt, device="meta")
        h_out = torch.empty(n, d_out, dtype=dt, device="meta")
        blocks = -(-n // lstsq.SHIFT_BLOCK_ROWS)
        s_in = torch.empty(blocks, d_in, device="meta")
        s_out = torch.empty(blocks, d_out, device="meta")
        plan, _ = lstsq.plan_accumulate(h_in, h_out, s_in, s_out)
        out.append((f"lstsq-{dtype_name}/accumulate", _LstsqLaunch(plan)))
    return out


def _kernel(launch):
    from esta_kernels.triton import lstsq
    from esta_kernels.triton import stitched_linear as sl

    return lstsq._lstsq_accumulate_kernel if launch.role == "lstsq" else sl._KERNELS[launch.role]


def _configs(launch, arch):
    from esta_kernels.triton import lstsq
    from esta_kernels.triton import stitched_linear as sl
    from esta_kernels.triton._common import arch_family

    family = arch_family(arch // 10)
    if launch.role == "lstsq":
        return lstsq.autotune_configs(family)
    return sl.autotune_configs(launch.role, family, launch.tune)


def _all_launches():
    out = []
    for dtype_name in DTYPES:
        out += _launches(dtype_name)
    return out + _lstsq_launches()


_TYPES = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32"}


def _ast_source(kernel, launch, config):
    """ASTSource of one launch + config, specialized the way triton's launcher would (portable across the
    triton 3.6-3.9 ASTSource API: signature by name, constants and attributes by argument path)."""
    import torch
    from triton.compiler import ASTSource

    meta = {**launch.meta, **config.kwargs}
    unspecialized = {p.name for p in kernel.params if p.do_not_specialize}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = meta[name] if name in meta else launch.args[name]
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


def _resource_usage(cubin: bytes):
    """(registers, stack bytes) of the cubin from the cuobjdump bundled with triton, or None."""
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    for line in res.stdout.splitlines():
        if "REG:" in line:
            fields = dict(kv.split(":", 1) for kv in line.split() if ":" in kv)
            return int(fields["REG"]), int(fields["STACK"])
    return None


def _jobs():
    jobs = []
    for label, launch in _all_launches():
        for arch in ARCHS:
            jobs += [(label, arch, i) for i in range(len(_configs(launch, arch)))]
    return jobs


def _worker(shard: int, shards: int) -> None:
    """Compiles this shard's jobs and prints one JSON line per job."""
    import triton
    from triton.backends.compiler import GPUTarget

    launches = dict(_all_launches())
    for label, arch, i in _jobs()[shard::shards]:
        launch = launches[label]
        kernel = _kernel(launch)
        config = _configs(launch, arch)[i]
        t0 = time.time()
        rec = dict(label=label, arch=arch, config=i, role=launch.role, tune=launch.tune, cfg=str(config))
        try:
            compiled = triton.compile(_ast_source(kernel, launch, config), target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
            ptx = compiled.asm.get("ptx", "")
            cubin = compiled.asm.get("cubin", b"")
            usage = _resource_usage(cubin) if cubin else None
            rec.update(ok=True, ptx=len(ptx), cubin=len(cubin), shared=int(compiled.metadata.shared),
                       wgmma="wgmma" in ptx, mma="mma.sync" in ptx, regs=usage and usage[0],
                       stack=usage and usage[1])
        except Exception as e:  # reported by the test, with the config that failed
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        rec["seconds"] = round(time.time() - t0, 2)
        print(json.dumps(rec), flush=True)


# ------------------------------------------------------------------------------------------- the test
def test_every_launch_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    # the workers import esta_kernels from this checkout, installed or not
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    t0 = time.time()
    procs = [
        subprocess.Popen([sys.executable, __file__, str(i), str(WORKERS)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i in range(WORKERS)
    ]
    records, errors = [], []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            errors.append(err[-4000:])
        records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    elapsed = time.time() - t0
    assert not errors, "a compile worker crashed:\n" + "\n".join(errors)

    failed = [r for r in records if not r["ok"]]
    assert not failed, "launches that failed to compile:\n" + "\n".join(
        f"{r['label']} sm_{r['arch']} {r['cfg']}: {r['error']}" for r in failed)
    assert len(records) >= 2 * len(DTYPES) * 6, "too few launches compiled"
    assert sum(r["role"] == "lstsq" for r in records) >= 2 * len(LSTSQ_DTYPES) * 2, "too few lstsq launches"
    for r in records:
        where = f"{r['label']} sm_{r['arch']} {r['cfg']}"
        assert r["ptx"] > 0 and r["cubin"] > 0, f"no PTX or cubin for {where}"
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], f"{where} needs {r['shared']} B of shared memory"
        if r["role"] == "gemm" and r["tune"].startswith("16bit"):
            # 16-bit main GEMMs must reach the tensor cores: wgmma on Hopper, mma.sync on Ampere
            assert r["wgmma"] if r["arch"] == 90 else r["mma"], f"{where}: no tensor-core MMA in the PTX"
        if r["stack"] is not None and r["label"].split("/")[0] not in ("float32", "lstsq-float32"):
            # float32 at full precision runs FMA loops that may spill a little; everything else may not
            assert r["stack"] == 0, f"{where}: registers spill ({r['regs']} registers, {r['stack']} B stack)"
    print(f"\ncompiled {len(records)} launches (2 archs x every dtype x every config) in "
          f"{elapsed:.0f} s with {WORKERS} workers; slowest {max(r['seconds'] for r in records):.1f} s")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]))
