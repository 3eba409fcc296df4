"""Compiles every Triton launch of the stitched linear and of the least-squares accumulation
(esta_kernels/triton/lstsq.py), for every autotune config, every dtype and both target GPUs (sm_80 Ampere,
sm_90 Hopper), without a GPU: the pointer kernels for both archs, the Hopper path (persistent kernel,
tensor descriptors) for sm_90, at rank 16 and 256 and in its fused-xa variant. Every Hopper-path config
must use wgmma and TMA without spilling; no 16-bit launch may contain a TF32 MMA.

The interpreter accepts kernels the GPU compiler rejects (e.g. a tl.dot dimension below 16), so passing
the interpreter tests is not enough. Here `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))` runs the real compiler down to PTX and a cubin. The launches are built by the module's own plan
functions (plan_forward / plan_backward) on meta tensors, so they are exactly what the launchers run; argument specialization (pointers
and multiples of 16 marked divisible by 16, ints equal to 1 made constants) mimics triton's launcher.

Compilation runs in subprocesses with TRITON_INTERPRET unset: under TRITON_INTERPRET=1 triton.jit returns
interpreter functions, which cannot be compiled. Two workers, a fresh Triton cache each run.
"""
from __future__ import annotations

import json
import os
import re
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
def _op_launches(dtype_name: str, arch, M=8192, K=4096, N=4096, r=16, S=40, tag="", mode="thin", g_mode="fused"):
    """(label, Launch) of every launch of one forward and one backward with every feature on, planned for
    `arch` (None: the pointer kernels), for LoRA factors in x's dtype and, for 16-bit x, in float32 (master
    weights). Reductions and the thin GEMMs do not depend on the factors' dtype beyond the first pass."""
    import torch

    from esta_kernels.triton import stitched_linear as sl

    dt = getattr(torch, dtype_name.split("+")[0])
    torch.backends.cuda.matmul.allow_tf32 = dtype_name.endswith("+tf32")

    def mk(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype, device="meta")

    x, w, b, dy, ids = mk(M, K), mk(N, K), mk(N), mk(M, N), mk(M, dtype=torch.int64)
    out = []
    for ld in ([dt] if dt == torch.float32 else [dt, torch.float32]):
        a, bb, sb = mk(r, K, dtype=ld), mk(N, r, dtype=ld), mk(S, N, dtype=ld)
        label = f"{dtype_name}/lora-{str(ld).replace('torch.', '')}{tag}"
        fwd = sl.plan_forward(x, w, b, a, bb, sb, ids, 2.0, arch=arch, mode=mode)
        bwd = sl.plan_backward(dy, x, w, a, bb, fwd.xa, ids, S, 2.0, [True] * 4, arch=arch, mode=g_mode)
        for name, launch in fwd.launches + bwd.launches:
            if ld != dt and name.startswith(("dlora", "xa", "g")) and launch.role != "tma_thin":
                continue  # the same launch as with factors in x's dtype (the reductions read x, dy, xa, g)
            out.append((f"{label}/{'fwd' if (name, launch) in fwd.launches else 'bwd'}-{name}", launch))
    return out


def _launches(dtype_name: str):
    """The pointer-kernel launches (what sm_80, float32 and TMA-illegal strides run), LLaMA-like shapes."""
    return _dedupe(_op_launches(dtype_name, None))


def _hopper_launches():
    """The Hopper path's launches (sm_90 only), every config: the LLaMA shape at r = 16 (both 16-bit dtypes,
    factors in x's dtype and float32) and at r = 256, the ViT-B shape, the fused-xa variant's main kernel,
    and the thin-g variant's g and dx launches."""
    out = []
    for dtype_name in ("float16", "bfloat16"):
        out += _op_launches(dtype_name, 90, tag="/hopper")
    out += _op_launches("bfloat16", 90, r=256, tag="/hopper-r256")
    out += _op_launches("bfloat16", 90, M=3152, K=768, N=2304, r=8, S=35, tag="/hopper-vit_b")
    out += [(label, l) for label, l in _op_launches("bfloat16", 90, tag="/hopper-fused", mode="fused")
            if "fwd-y" in label]
    # ESTA_TRITON_G=thin: g by a thin launch, then dx reading it through a descriptor (the default computes g
    # in the dx launch's g jobs, above), at r = 16 and 256
    for r in (16, 256):
        out += [(label, l) for label, l in _op_launches("bfloat16", 90, r=r, tag=f"/hopper-thin-g-r{r}",
                                                         g_mode="thin") if "bwd-g" in label or "bwd-dx" in label]
    return _dedupe(out)


def _dedupe(launches):
    """Drops launches whose compiled form is the same as an earlier one's (same kernel, same specialized
    signature and constexprs): the compile cache would serve them anyway."""
    import torch

    def spec(v):
        if isinstance(v, torch.Tensor):
            return str(v.dtype)
        if isinstance(v, int) and not isinstance(v, bool):
            return ("int", v == 1, v % 16 == 0)
        return repr(v) if v is None or isinstance(v, (bool, str)) else type(v).__name__

    seen, out = set(), []
    for label, launch in launches:
        key = (launch.role, launch.tune, tuple(sorted(launch.meta.items())),
               tuple((k, spec(v)) for k, v in sorted(launch.args.items())))
        if key not in seen:
            seen.add(key)
            out.append((label, launch))
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


def _archs(launch):
    return (90,) if launch.role.startswith("tma") else ARCHS


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
    return out + _hopper_launches() + _lstsq_launches()


def _ast_source(kernel, launch, config):
    from esta_kernels.inspect import ast_source

    return ast_source(kernel, launch.args, {**launch.meta, **config.kwargs})


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
        for arch in _archs(launch):
            jobs += [(label, arch, i) for i in range(len(_configs(launch, arch)))]
    return jobs


def _worker(shard: int, shards: int) -> None:
    """Compiles this shard's jobs and prints one JSON line per job."""
    import triton
    from triton.backends.compiler import GPUTarget

    from esta_kernels.inspect import ptxas_usage

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
                       wgmma="wgmma.mma_async" in ptx, mma="mma.sync" in ptx, tma="cp.async.bulk.tensor" in ptx,
                       tf32=bool(re.search(r"(wgmma|mma)[.\w]*\.tf32", ptx)), regs=usage and usage[0],
                       stack=usage and usage[1], spills=None)
            if launch.role.startswith("tma"):  # exact spill counts for the Hopper path (ptxas -v)
                spill = ptxas_usage(ptx, arch)
                rec["spills"] = None if spill["spill_stores"] is None else spill["spill_stores"] + spill["spill_loads"]
        except Exception as e:  # reported by the test, with the config that failed
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
        rec["seconds"] = round(time.time() - t0, 2)
        print(json.dumps(rec), flush=True)


# ------------------------------------------------------------------------------------------- the test
def test_every_launch_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    # the workers import esta_kernels from this checkout, installed or not
    from tests.helpers import ROOT

    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
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
        if r["stack"] is not None and not r["label"].startswith(("float32", "lstsq-float32")):
            # float32 at full precision (the one-hot sums stay IEEE under TF32 too) runs FMA loops that may
            # spill a little; everything else may not
            assert r["stack"] == 0 and not r["spills"], \
                f"{where}: registers spill ({r['regs']} registers, {r['stack']} B stack, {r['spills']} B spilled)"
        if r["label"].split("/")[0] in ("float16", "bfloat16"):
            assert not r["tf32"], f"{where}: a TF32 MMA for 16-bit activations"
        if r["role"].startswith("tma"):
            # the Hopper path: wgmma fed by TMA, every config without a spill (the configs are kept to those)
            assert r["wgmma"] and r["tma"], f"{where}: wgmma {r['wgmma']}, TMA {r['tma']}"
            assert r["spills"] == 0, f"{where}: {r['spills']} B spilled"
    hopper = [r for r in records if r["role"].startswith("tma")]
    assert len(hopper) >= 40 and any("r256" in r["label"] for r in hopper) and any(
        "fused" in r["label"] for r in hopper), "too few Hopper-path launches compiled"
    print(f"\ncompiled {len(records)} launches (2 archs x every dtype x every config) in "
          f"{elapsed:.0f} s with {WORKERS} workers; slowest {max(r['seconds'] for r in records):.1f} s")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]))
