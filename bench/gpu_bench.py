#!/usr/bin/env python3
"""GPU benchmark of the stitched linear, written as JSON (bench/gpu_check.sh runs it on a lent GPU).

    python3 bench/gpu_bench.py --out DIR           # bfloat16 on the GPU: DIR/gpu_bench.json
    python3 bench/gpu_bench.py --cpu-dry-run       # the same harness on the CPU, tiny shapes, float32

For each shape (bench.shapes.GPU_SHAPES: LLaMA-7B q_proj, MLP up and down, ViT-B and ViT-S qkv) and provider
(bench.providers.GPU_SCRIPT_PROVIDERS: cuBLAS F.linear alone, the naive composition eager, the
cuBLAS-accumulate composition, esta triton, esta cuda, esta triton with xa fused into the main loop, the
Hopper path's persistent kernel as a plain GEMM, the naive composition under
torch.compile(mode="max-autotune-no-cudagraphs"), and esta triton with g by its own launch, last) it records:
  fwd_us, fwd_bwd_us   median of per-call CUDA-event times after warm-up; calls rotate over several input
                       sets (each with its own x, weights and grad_y) whose total size is several times
                       the L2 cache, so no call finds its operands in L2 from the call before
  fwd_tflops, ...      FLOP count / median time; forward = 2MKN + 2MKr + 2MrN, forward+backward adds
                       dx = 2MNK + 2MrK and the LoRA grads (g = dy B: 2MNr, dA: 2MrK, dB: 2MNr); the
                       F.linear floor counts only its own 2MKN (+ 2MNK for dx)
  peak_bytes           torch.cuda.max_memory_allocated during one forward+backward, minus what was
                       allocated before it (the inputs of every set, the weights): y, saved tensors,
                       temporaries and the gradients
  saved_bytes          activation bytes kept for backward (bench.providers.saved_activation_bytes)
  rel_errors, check    y and every gradient against the float32 torch reference (float64 in the dry run)
  fwd_ratio, ...       time (and peak) relative to F.linear on the same shape
A provider that cannot run is recorded as skipped with the reason; one that raises, as error with the
message, and the run goes on. The JSON is rewritten after every shape, so a run cut short keeps what it
measured. The ceiling of the card (one large bf16 matmul, a device-to-device copy) is recorded too.
--budget-s bounds the run: providers still to do when it is spent are skipped with that reason.

Last, under the JSON's `train_step` key: one ESTA training step (bench/train_step.py: Trainer.train_step on a
ViT-S + ViT-B stitchable model, random weights, bfloat16 autocast, batch 64) with every StitchedLinear fused
against backend="torch", in interleaved pairs training the same stitch: median step time and peak memory
(torch.cuda.max_memory_allocated after reset_peak_memory_stats) per provider, beside the paper's 9,685 MB at
batch 64. The shapes and lstsq sections stop starting new work --train-step-reserve-s before the budget ends,
so this one keeps its time. In the dry run: two tiny ViTs, batch 4, the CPU memory accounting of
bench/train_step.py. --sections picks the sections (e.g. --sections train_step alone).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.shapes import GPU_SHAPES, QUICK_SHAPES, make_inputs  # noqa: E402

FLOOR = "flinear"


# ------------------------------------------------------------------------------------------ environment
def _run(cmd: list, timeout: float = 15.0):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Card, driver, software versions and date."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "hostname": platform.node(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import esta_kernels

        info["esta_backends"] = esta_kernels.available_backends()
        info["esta_extension_error"] = esta_kernels._ext.EXTENSION_ERROR
    except Exception as exc:  # the benchmark still records why esta did not import
        info["esta_backends"] = None
        info["esta_import_error"] = f"{type(exc).__name__}: {exc}"
    info["git_commit"] = _run(["git", "-C", ROOT, "rev-parse", "HEAD"])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["card"] = torch.cuda.get_device_name(device)
        info["capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
        info["sm_count"] = props.multi_processor_count
        info["memory_bytes"] = props.total_memory
        info["l2_bytes"] = getattr(props, "L2_cache_size", None)
        smi = _run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm,power.limit",
                    "--format=csv,noheader", f"--id={device.index or 0}"])
        info["nvidia_smi"] = smi
        info["driver"] = smi.split(",")[0].strip() if smi else None
        if info["driver"] is None:
            try:  # an int such as 13000 (the CUDA version the driver supports)
                info["driver"] = f"cuda-driver-api-{torch._C._cuda_getDriverVersion()}"
            except Exception:
                pass
    else:
        model = None
        try:
            with open("/proc/cpuinfo") as f:
                model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        except OSError:
            pass
        info["card"] = model or platform.processor() or "cpu"
        info["driver"] = None
        info["torch_threads"] = torch.get_num_threads()
    return info


# ----------------------------------------------------------------------------------------------- timing
class Timer:
    """Median of per-call times after warm-up, calls rotated over `calls` (one per input set).

    On CUDA each call sits between two CUDA events, so launch gaps the CPU causes count, as they do in an
    eager training step; on the CPU, time.perf_counter around each call."""

    def __init__(self, device: torch.device, warmup: int, target_s: float, min_reps: int, max_reps: int):
        self.cuda = device.type == "cuda"
        self.warmup, self.target_s, self.min_reps, self.max_reps = warmup, target_s, min_reps, max_reps

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, calls: list) -> dict:
        n = len(calls)
        for i in range(self.warmup * n):
            calls[i % n]()
        self.sync()
        t0 = time.perf_counter()
        for i in range(n):
            calls[i]()
        self.sync()
        est = max((time.perf_counter() - t0) / n, 1e-7)
        reps = max(self.min_reps, min(self.max_reps, int(self.target_s / est)))
        reps = n * math.ceil(reps / n)  # every input set equally often
        times = []
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for i, (start, end) in enumerate(events):
                start.record()
                calls[i % n]()
                end.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) * 1e3 for s, e in events]  # ms -> us
        else:
            for i in range(reps):
                t = time.perf_counter()
                calls[i % n]()
                times.append((time.perf_counter() - t) * 1e6)
        q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
        return {"median_us": statistics.median(times), "p10_us": q[0], "p90_us": q[-1], "reps": reps}


def peak_bytes(runner, device: torch.device):
    """Peak allocated bytes of one forward+backward above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    runner.zero_grad()
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
    runner.zero_grad()
    return int(peak)


def ceiling(device: torch.device, dtype: torch.dtype, timer: Timer, dry: bool) -> dict:
    """What the card can do at best: a large matmul's TFLOP/s, and copy bandwidth (read + write bytes)."""
    n = 256 if dry else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    mm = timer([lambda: torch.mm(a, b, out=c)])
    nbytes = (1 << 24) if dry else (1 << 30)
    src = torch.empty(nbytes, device=device, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    cp = timer([lambda: dst.copy_(src)])
    out = {
        "matmul": {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_us": mm["median_us"],
                   "tflops": 2 * n ** 3 / (mm["median_us"] * 1e-6) / 1e12},
        "copy": {"bytes": nbytes, "median_us": cp["median_us"],
                 "gb_per_s": 2 * nbytes / (cp["median_us"] * 1e-6) / 1e9},
    }
    return out


# -------------------------------------------------------------------------------------------- one shape
def _input_sets(shape, dtype, device, l2_bytes, dry):
    """Enough independent input sets that their total is >= 3x the L2 cache (2 to 8 sets)."""
    first = make_inputs(shape, dtype=dtype, device=device, seed=0)
    n = 2 if dry else max(2, min(8, math.ceil(3 * l2_bytes / max(first.nbytes(), 1))))
    sets = [first] + [make_inputs(shape, dtype=dtype, device=device, seed=i) for i in range(1, n)]
    for s in sets:
        s.set_requires_grad(True)
    return sets


def run_shape(shape, provider_names, *, device, dtype, timer, ref_dtype, l2_bytes, deadline, dry, log) -> dict:
    from bench.providers import PROVIDERS, check_against_reference, reference_outputs, saved_activation_bytes, tolerance

    sets = _input_sets(shape, dtype, device, l2_bytes, dry)
    refs = {lora: reference_outputs(sets[0], ref_dtype, lora=lora) for lora in (True, False)}
    result = {**shape.as_dict(), "dtype": str(dtype).replace("torch.", ""), "input_sets": len(sets),
              "input_set_bytes": sets[0].nbytes(), "providers": {}}
    tol = tolerance(dtype, device.type)
    for name in provider_names:
        p = PROVIDERS[name]
        entry = {"description": p.description}
        result["providers"][name] = entry
        reason = p.unavailable(device)
        if reason is None and time.monotonic() > deadline:
            reason = "the time budget (--budget-s) was spent before this provider"
        if reason:
            entry.update(status="skipped", reason=reason)
            log(f"  {name:<24} skipped: {reason}")
            continue
        runners = []
        try:
            t0 = time.monotonic()
            runners = [p.build(s) for s in sets]
            errs = check_against_reference(runners[0], refs[p.computes_lora], backward=True)
            entry["first_calls_s"] = round(time.monotonic() - t0, 3)  # compile / autotune / first launch
            entry["rel_errors"] = errs
            entry["tolerance"] = tol
            entry["check"] = "ok" if all(v <= tol for v in errs.values()) else "MISMATCH"
            try:
                entry["saved_bytes"] = saved_activation_bytes(runners[0])
            except Exception as exc:  # e.g. a compiled graph that refuses saved-tensor hooks: still time it
                entry["saved_bytes"] = None
                entry["saved_bytes_error"] = f"{type(exc).__name__}: {exc}"[:500]
            fwd = timer([r.forward for r in runners])
            fwd_bwd = timer([r.fwd_bwd for r in runners])
            entry["peak_bytes"] = peak_bytes(runners[0], device)
            f_flops = shape.forward_flops(p.computes_lora)
            b_flops = f_flops + shape.backward_flops(p.computes_lora)
            entry.update(
                status="ok",
                fwd_us=fwd["median_us"], fwd_p10_us=fwd["p10_us"], fwd_p90_us=fwd["p90_us"], fwd_reps=fwd["reps"],
                fwd_bwd_us=fwd_bwd["median_us"], fwd_bwd_p10_us=fwd_bwd["p10_us"], fwd_bwd_p90_us=fwd_bwd["p90_us"],
                fwd_bwd_reps=fwd_bwd["reps"],
                fwd_flops=f_flops, fwd_bwd_flops=b_flops,
                fwd_tflops=f_flops / (fwd["median_us"] * 1e-6) / 1e12,
                fwd_bwd_tflops=b_flops / (fwd_bwd["median_us"] * 1e-6) / 1e12,
            )
            log(f"  {name:<24} fwd {fwd['median_us']:10.1f} us  fwd+bwd {fwd_bwd['median_us']:10.1f} us  "
                f"peak {_mb(entry['peak_bytes'])}  saved {_mb(entry['saved_bytes'])}  check {entry['check']}"
                f"  (first calls {entry['first_calls_s']} s)")
        except Exception as exc:  # record and go on: one broken provider must not cost the whole run
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                         traceback=traceback.format_exc()[-4000:])
            log(f"  {name:<24} ERROR {type(exc).__name__}: {str(exc)[:300]}")
        finally:
            for r in runners:
                r.zero_grad()
            del runners
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_ratios(result)
    return result


def add_ratios(shape_result: dict) -> None:
    floor = shape_result["providers"].get(FLOOR, {})
    for entry in shape_result["providers"].values():
        if entry.get("status") != "ok" or floor.get("status") != "ok":
            continue
        for key in ("fwd_us", "fwd_bwd_us", "peak_bytes"):
            if entry.get(key) is not None and floor.get(key):
                entry[key.replace("_us", "").replace("_bytes", "") + "_ratio"] = entry[key] / floor[key]


def _mb(n):
    return "-" if n is None else f"{n / 2**20:.1f} MB"


# ------------------------------------------------------------------------------------------------- main
# ------------------------------------------------------------------------------------ least-squares init
# (name, tokens, d_in, d_out): SN-Net's calibration of 100 images at ViT-Ti -> S and ViT-S -> B
LSTSQ_SHAPES = (("vit_ti_to_s", 19700, 192, 384), ("vit_s_to_b", 19700, 384, 768))
LSTSQ_DRY_SHAPES = (("tiny_lstsq", 600, 24, 40),)


def run_lstsq(*, device, dtype, timer, deadline, dry, log) -> list:
    """Times lstsq_init (one fused accumulation + the float64 solve) per backend on `device`, beside SN-Net's
    method (pinv of [H_in, 1] over every token, float32 on the CPU), with max |dW| against a float64
    least-squares solve of the same (rounded) activations."""
    import esta_kernels
    from esta_kernels.reference import pinv_lstsq

    backends = [b for b in esta_kernels.available_backends() if b != "torch" or dry]
    backends = [b for b in backends if (b in ("cpu", "torch")) == (device.type == "cpu")]
    out = []
    for name, n, d_in, d_out in (LSTSQ_DRY_SHAPES if dry else LSTSQ_SHAPES):
        g = torch.Generator().manual_seed(0)
        mix = torch.randn(d_in, d_out, generator=g) / d_in ** 0.5
        h_in = torch.randn(n, d_in, generator=g) + 0.5
        h_out = h_in @ mix + 0.1 * torch.randn(n, d_out, generator=g)
        h_in_dev, h_out_dev = h_in.to(device, dtype), h_out.to(device, dtype)
        x64 = torch.cat([h_in_dev.double().cpu(), torch.ones(n, 1, dtype=torch.float64)], 1)
        ref = torch.linalg.lstsq(x64, h_out_dev.double().cpu()).solution[:-1].t()
        res = {"name": name, "tokens": n, "d_in": d_in, "d_out": d_out, "providers": {}}
        h_in_cpu, h_out_cpu = h_in_dev.float().cpu(), h_out_dev.float().cpu()
        t = time.perf_counter()
        w_pinv, _ = pinv_lstsq(h_in_cpu, h_out_cpu)
        res["providers"]["pinv_cpu"] = {"median_us": (time.perf_counter() - t) * 1e6, "reps": 1,
                                        "max_abs_dw": (w_pinv.double() - ref).abs().max().item()}
        for b in backends:
            if time.monotonic() > deadline:
                res["providers"][f"esta_{b}"] = {"skipped": "time budget spent"}
                continue
            try:
                w, _ = esta_kernels.lstsq_init(h_in_dev, h_out_dev, backend=b)
                stats = timer([lambda b=b: esta_kernels.lstsq_init(h_in_dev, h_out_dev, backend=b)])
                stats["max_abs_dw"] = (w.double().cpu() - ref).abs().max().item()
                stats["x_faster_than_pinv"] = res["providers"]["pinv_cpu"]["median_us"] / stats["median_us"]
                res["providers"][f"esta_{b}"] = stats
            except Exception as exc:
                res["providers"][f"esta_{b}"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"lstsq {name}: " + ", ".join(
            f"{k} {v['median_us'] / 1e3:.2f} ms (|dW| {v['max_abs_dw']:.1e})" if "median_us" in v else f"{k} {v}"
            for k, v in res["providers"].items()))
        out.append(res)
    return out


# ---------------------------------------------------------------------------------------- training step
# GPU: the issue's setting beside the paper's figure; dry run: the same code path, tiny and quick
TRAIN_STEP_GPU = {"model": "vit_s_b", "batch": 64, "warmup_pairs": 2, "pairs": 10, "memory_pairs": 1}
TRAIN_STEP_DRY = {"model": "tiny", "batch": 4, "warmup_pairs": 1, "pairs": 2, "memory_pairs": 1}


def run_train_step(*, device, dry, deadline, log, model=None, batch=None, pairs=None) -> dict:
    """bench.train_step.run at TRAIN_STEP_GPU (TRAIN_STEP_DRY in the dry run) with bfloat16 autocast, every
    palette member primed first; see bench/train_step.py for what is measured."""
    import importlib.util

    from bench import train_step

    if importlib.util.find_spec("timm") is None:
        log("train_step: skipped (timm is not installed)")
        return {"status": "skipped", "reason": "timm is not installed (pip install timm)"}
    if train_step.resolved_backend("fused", device) == "torch":
        log("train_step: skipped (no fused backend here)")
        return {"status": "skipped", "reason": f"backend 'auto' resolves to 'torch' on {device.type} (no compiled "
                                               "kernels or Triton, or ESTA_BACKEND is set): nothing to compare"}
    cfg = dict(TRAIN_STEP_DRY if dry else TRAIN_STEP_GPU)
    cfg.update({k: v for k, v in (("model", model), ("batch", batch), ("pairs", pairs)) if v is not None})
    res = train_step.run(cfg["model"], batch=cfg["batch"], device=device, bf16=True, warmup_pairs=cfg["warmup_pairs"],
                         pairs=cfg["pairs"], memory_pairs=cfg["memory_pairs"], prime_members=True,
                         deadline=deadline, log=log)
    res["status"] = "ok"
    log(train_step.format_result(res))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder for gpu_bench.json (default: bench/results, or a "
                                                 "temporary folder with --cpu-dry-run)")
    ap.add_argument("--name", default="gpu_bench.json", help="file name inside --out")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the harness on the CPU: tiny shapes, float32, torch and cpu backends")
    ap.add_argument("--budget-s", type=float, default=170.0, help="stop starting new providers after this long")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    ap.add_argument("--providers", default=None, help="comma-separated provider names (default: all)")
    ap.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    ap.add_argument("--sections", default="shapes,lstsq,train_step",
                    help="comma-separated sections to run: shapes, lstsq, train_step (default: all)")
    ap.add_argument("--train-step-reserve-s", type=float, default=None,
                    help="seconds of --budget-s kept for the train_step section (default 70 on a GPU, 10 in the "
                         "dry run; at most half the budget)")
    ap.add_argument("--train-step-model", default=None, help="bench.train_step model name (default vit_s_b; "
                                                             "tiny in the dry run)")
    ap.add_argument("--train-step-batch", type=int, default=None, help="default 64 (4 in the dry run)")
    args = ap.parse_args(argv)
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(sections) - {"shapes", "lstsq", "train_step"})
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; expected shapes, lstsq, train_step")

    from bench.providers import DRY_RUN_PROVIDERS, GPU_SCRIPT_PROVIDERS

    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    dry = args.cpu_dry_run
    reserve = 0.0
    if "train_step" in sections:
        reserve = args.train_step_reserve_s if args.train_step_reserve_s is not None else (10.0 if dry else 70.0)
        reserve = min(reserve, args.budget_s / 2)
    early_deadline = deadline - reserve  # shapes and lstsq start nothing new after it
    if not dry and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device is visible; use --cpu-dry-run to exercise the harness on the CPU",
              file=sys.stderr)
        return 2
    if dry:
        torch.set_num_threads(1)  # small shared CPUs: 2 threads wait out scheduler slices when a core is busy
    device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if dry else torch.bfloat16
    ref_dtype = torch.float64 if dry else torch.float32
    shapes = QUICK_SHAPES if dry else GPU_SHAPES
    providers = DRY_RUN_PROVIDERS if dry else GPU_SCRIPT_PROVIDERS
    if args.shapes:
        wanted = args.shapes.split(",")
        shapes = tuple(s for s in shapes if s.name in wanted)
    if args.providers:
        wanted = args.providers.split(",")
        providers = tuple(p for p in providers if p in wanted or p == FLOOR)
    timer = (Timer(device, warmup=1, target_s=0.02, min_reps=3, max_reps=20) if dry
             else Timer(device, warmup=3, target_s=0.15, min_reps=10, max_reps=200))

    out_dir = args.out or (os.path.join(ROOT, "bench", "results") if not dry else None)
    if out_dir is None:
        import tempfile

        out_dir = tempfile.mkdtemp(prefix="esta-gpu-bench-")
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, args.name)

    def log(msg):
        print(msg, flush=True)

    env = environment(device)
    report = {
        "mode": "cpu-dry-run" if dry else "gpu",
        "environment": env,
        "dtype": str(dtype).replace("torch.", ""),
        "flops_note": "fwd = 2MKN + 2MKr + 2MrN; fwd_bwd adds 2MNK (dx) + 2MrK (g A) + 2MNr (g) + 2MrK (dA) "
                      "+ 2MNr (dB); flinear counts 2MKN and 2MNK only",
        "timing_note": "median of per-call times after warm-up, calls rotated over input_sets independent "
                       "input sets (>= 3x L2 in total)" + (" (perf_counter, CPU)" if dry else " (CUDA events)"),
        "shapes": [],
    }
    log(f"gpu_bench: {env['card']} | driver {env['driver']} | torch {env['torch']} | triton {env['triton']} | "
        f"esta backends {env.get('esta_backends')} | {report['mode']}, {report['dtype']}")
    try:
        report["ceiling"] = ceiling(device, torch.float32 if dry else torch.bfloat16, timer, dry)
        c = report["ceiling"]
        log(f"ceiling: matmul {c['matmul']['n']}^3 {c['matmul']['tflops']:.1f} TFLOP/s, "
            f"copy {c['copy']['gb_per_s']:.0f} GB/s (read+write)")
    except Exception as exc:
        report["ceiling"] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"ceiling: ERROR {exc}")

    l2 = (env.get("l2_bytes") or 50 * 2**20) if not dry else 0
    for shape in (shapes if "shapes" in sections else ()):
        log(f"{shape.name}: M={shape.M} K={shape.K} N={shape.N} r={shape.r} S={shape.S}")
        try:
            res = run_shape(shape, providers, device=device, dtype=dtype, timer=timer, ref_dtype=ref_dtype,
                            l2_bytes=l2, deadline=early_deadline, dry=dry, log=log)
        except Exception as exc:  # e.g. out of memory while making the inputs
            res = {**shape.as_dict(), "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            log(f"  ERROR {exc}")
        report["shapes"].append(res)
        report["elapsed_s"] = round(time.monotonic() - t_start, 1)
        _write(out_path, report)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "lstsq" in sections:
        try:
            report["lstsq"] = run_lstsq(device=device, dtype=dtype, timer=timer, deadline=early_deadline, dry=dry,
                                        log=log)
        except Exception as exc:
            report["lstsq"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            log(f"lstsq: ERROR {exc}")
        report["elapsed_s"] = round(time.monotonic() - t_start, 1)
        _write(out_path, report)
    if "train_step" in sections:
        # written first, so a run killed in the middle of this section says so in the JSON
        report["train_step"] = {"status": "started", "reason": "no result: the run ended inside this section"}
        _write(out_path, report)
        if time.monotonic() > deadline:
            report["train_step"] = {"status": "skipped", "reason": "the time budget (--budget-s) was spent before it"}
            log("train_step: skipped (time budget spent)")
        else:
            log(f"train_step: {time.monotonic() - t_start:.0f} s into the run, {deadline - time.monotonic():.0f} s "
                f"of budget left")
            try:
                report["train_step"] = run_train_step(device=device, dry=dry, deadline=deadline, log=log,
                                                      model=args.train_step_model, batch=args.train_step_batch)
            except Exception as exc:  # e.g. out of memory: recorded, and the JSON and table still come out
                report["train_step"] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000],
                                        "traceback": traceback.format_exc()[-4000:]}
                log(f"train_step: ERROR {type(exc).__name__}: {str(exc)[:300]}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["elapsed_s"] = round(time.monotonic() - t_start, 1)
        _write(out_path, report)
    if not args.no_table:
        print(format_table(report))
    log(f"gpu_bench: wrote {out_path} in {report['elapsed_s']} s")
    return 0


def _write(path: str, report: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def format_table(report: dict) -> str:
    """provider x shape: fwd us, ratio to F.linear, fwd+bwd us, ratio, peak MB (saved MB where no peak)."""
    lines = [f"{'shape':<16}{'provider':<24}{'fwd us':>10}{'x floor':>9}{'fwd+bwd us':>12}{'x floor':>9}"
             f"{'peak MB':>10}{'saved MB':>10}{'TFLOP/s':>9}  check"]
    for s in report.get("shapes", []):
        if "providers" not in s:
            lines.append(f"{s['name']:<16}ERROR {s.get('error', '')[:80]}")
            continue
        for name, e in s["providers"].items():
            if e.get("status") != "ok":
                why = e.get("reason") or e.get("error") or ""
                lines.append(f"{s['name']:<16}{name:<24}{e.get('status', '?')}: {why[:90]}")
                continue

            def fmt(v, spec):
                return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)

            peak = e.get("peak_bytes")
            lines.append(
                f"{s['name']:<16}{name:<24}{fmt(e['fwd_us'], '10.1f')}{fmt(e.get('fwd_ratio'), '9.2f')}"
                f"{fmt(e['fwd_bwd_us'], '12.1f')}{fmt(e.get('fwd_bwd_ratio'), '9.2f')}"
                f"{fmt(None if peak is None else peak / 2**20, '10.1f')}"
                f"{fmt(None if e.get('saved_bytes') is None else e['saved_bytes'] / 2**20, '10.2f')}"
                f"{e['fwd_bwd_tflops']:>9.1f}  {e['check']}")
    ts = report.get("train_step")
    if ts:
        from bench.train_step import format_result

        lines.append("")
        lines.append(format_result(ts))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
