"""Runs the whole CPU benchmark comparison once and prints medians side by side with ratios to F.linear.

    python -m bench.compare                  # the main command (about 3-4 minutes on 2 cores)
    python -m bench.compare --quick          # tiny shapes, few rounds: checks the harness, measures nothing
    python -m bench.compare --json out.json  # also write every time measured
    python -m bench.compare --via-pytest     # the same cases through pytest-benchmark instead

The machines this runs on are small and shared, so by default the providers of one group (device, shape,
mode) are timed interleaved: each round runs every provider once, in a fresh random order, and the
medians over rounds are compared. A burst of background load then hits all providers alike instead of
whichever one pytest-benchmark happened to be timing. `--via-pytest` runs
bench/test_bench_stitched_linear.py under pytest-benchmark (providers one after another) and prints the
same table from its JSON. Either way every number comes from one run, and each provider's output and
gradients are checked against the float64 reference before it is timed.

Columns: median ms per call; 'x floor' = median / F.linear's median in the same group; saved MB = the
activation bytes kept for backward (bench.providers.saved_activation_bytes); IQR% = interquartile range
/ median, a noise gauge (above ~20% the machine was busy: rerun).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BENCH_FILE = os.path.join("bench", "test_bench_stitched_linear.py")
FLOOR = "flinear"
MODES = ("fwd", "fwd_bwd")


def _cases():
    import torch

    from bench.providers import CPU_BENCH_PROVIDERS, CUDA_BENCH_PROVIDERS

    out = [("cpu", torch.float32, CPU_BENCH_PROVIDERS)]
    if torch.cuda.is_available():
        out.append(("cuda", torch.bfloat16, CUDA_BENCH_PROVIDERS))
    return out


def _quantiles(times):
    if len(times) < 2:
        return times[0], 0.0
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


# ------------------------------------------------------------------------------------ interleaved timing
def run_interleaved(rounds: int, warmup: int, seed: int = 0) -> tuple:
    """Returns (rows, skipped): one row per (device, shape, provider, mode); skipped = (device, name, why)."""
    import torch

    from bench.providers import (PROVIDERS, check_against_reference, reference_outputs, saved_activation_bytes,
                                 tolerance)
    from bench.shapes import cpu_shapes, make_inputs

    rng = random.Random(seed)
    rows, skipped = [], []
    for device, dtype, names in _cases():
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        avail = []
        for name in names:
            reason = PROVIDERS[name].unavailable(device)
            if reason:
                skipped.append((device, name, reason))
            else:
                avail.append(name)
        for shape in cpu_shapes():
            print(f"  {device} {shape.name} ...", flush=True)
            inp = make_inputs(shape, dtype=dtype, device=device, seed=0)
            inp.set_requires_grad(True)
            refs = {lora: reference_outputs(inp, torch.float64, lora=lora) for lora in (True, False)}
            runners, info = {}, {}
            for name in avail:
                p = PROVIDERS[name]
                runner = p.build(inp)
                errs = check_against_reference(runner, refs[p.computes_lora], backward=True)
                tol = tolerance(dtype, device)
                bad = {k: v for k, v in errs.items() if not v <= tol}
                if bad:
                    raise AssertionError(f"{name} on {shape.name} disagrees with the float64 reference: "
                                         f"relative errors {bad}, tolerance {tol}")
                runners[name] = runner
                info[name] = dict(saved_bytes=saved_activation_bytes(runner), rel_errors=errs,
                                  computes_lora=p.computes_lora, description=p.description)
            for mode in MODES:
                calls = {n: (r.fwd_bwd if mode == "fwd_bwd" else r.forward) for n, r in runners.items()}
                for _ in range(warmup):
                    for call in calls.values():
                        call()
                sync()
                times = {n: [] for n in calls}
                order = list(calls)
                gc.collect()
                gc.disable()
                try:
                    for _ in range(rounds):
                        rng.shuffle(order)
                        for n in order:
                            t = time.perf_counter()
                            calls[n]()
                            sync()
                            times[n].append(time.perf_counter() - t)
                finally:
                    gc.enable()
                for n in order:
                    runners[n].zero_grad()
                for n in calls:
                    med, iqr = _quantiles(times[n])
                    flops = shape.forward_flops(info[n]["computes_lora"])
                    if mode == "fwd_bwd":
                        flops += shape.backward_flops(info[n]["computes_lora"])
                    rows.append(dict(device=device, dtype=str(dtype).replace("torch.", ""), shape=shape.as_dict(),
                                     provider=n, mode=mode, median_s=med, iqr_s=iqr, rounds=rounds,
                                     flops=flops, times_s=times[n], **info[n]))
            del runners, inp, refs
            gc.collect()
    return rows, skipped


# ------------------------------------------------------------------------------------- via pytest-benchmark
def run_pytest(rounds: int, warmup: int, quick: bool, keyword, json_path) -> tuple:
    env = dict(os.environ)
    if quick:
        env["ESTA_BENCH_QUICK"] = "1"
    env["ESTA_BENCH_ROUNDS"] = str(rounds)
    env["ESTA_BENCH_WARMUP"] = str(warmup)
    env.pop("TRITON_INTERPRET", None)  # never time the interpreter
    with tempfile.TemporaryDirectory() as tmp:
        out_json = json_path or os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", BENCH_FILE, "-q", "-p", "no:cacheprovider",
               f"--benchmark-json={out_json}", "--benchmark-disable-gc", "--benchmark-columns=median,iqr,rounds"]
        if keyword:
            cmd += ["-k", keyword]
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        print("pytest: " + (lines[-1] if lines else f"exit {proc.returncode}"), flush=True)
        if proc.returncode != 0:
            sys.stdout.write(proc.stdout[-20000:])
            sys.stderr.write(proc.stderr[-5000:])
        if not os.path.exists(out_json):
            raise SystemExit(proc.returncode or 1)
        with open(out_json) as f:
            data = json.load(f)
    rows = []
    for b in data["benchmarks"]:
        info = b["extra_info"]
        rows.append(dict(device=info["device"], dtype=info["dtype"], shape=info["shape"], provider=info["provider"],
                         mode=info["mode"], median_s=b["stats"]["median"], iqr_s=b["stats"]["iqr"],
                         rounds=b["stats"]["rounds"], flops=info["flops"], saved_bytes=info["saved_bytes"],
                         rel_errors=info["rel_errors"]))
    return rows, proc.returncode


# ----------------------------------------------------------------------------------------------- table
def format_table(rows: list) -> str:
    """One block per (device, shape): a row per provider with fwd and fwd_bwd medians and ratios."""
    blocks, order = {}, []
    for r in rows:
        key = (r["device"], r["shape"]["name"])
        if key not in blocks:
            blocks[key] = {}
            order.append(key)
        blocks[key].setdefault(r["provider"], {})[r["mode"]] = r
    lines = []
    for key in order:
        provs = blocks[key]
        any_r = next(iter(next(iter(provs.values())).values()))
        s = any_r["shape"]
        lines += ["", f"{key[0]} {any_r['dtype']}  {s['name']}: M={s['M']} K={s['K']} N={s['N']} r={s['r']} "
                      f"S={s['S']}{' +bias' if s['bias'] else ''}  ({s['note']})",
                  f"{'provider':<12}{'fwd ms':>10}{'x floor':>9}{'fwd+bwd ms':>12}{'x floor':>9}{'GFLOP/s':>9}"
                  f"{'saved MB':>10}{'IQR% fwd':>10}{'bwd':>6}"]
        floor = provs.get(FLOOR, {})
        for prov, modes in provs.items():
            row = f"{prov:<12}"
            for mode, width in (("fwd", 10), ("fwd_bwd", 12)):
                r = modes.get(mode)
                if r is None:
                    row += f"{'-':>{width}}{'-':>9}"
                    continue
                base = floor.get(mode)
                ratio = f"{r['median_s'] / base['median_s']:.2f}" if base else "-"
                row += f"{r['median_s'] * 1e3:>{width}.2f}{ratio:>9}"
            fb = modes.get("fwd_bwd")
            row += f"{fb['flops'] / fb['median_s'] / 1e9:>9.1f}" if fb else f"{'-':>9}"
            some = fb or modes.get("fwd")
            row += f"{some['saved_bytes'] / 2**20:>10.2f}"
            for mode, width in (("fwd", 10), ("fwd_bwd", 6)):
                r = modes.get(mode)
                row += f"{100 * r['iqr_s'] / r['median_s']:>{width}.0f}" if r else f"{'-':>{width}}"
            lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds: a smoke test of the harness")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 15; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds per case (default 3; quick 1)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--via-pytest", action="store_true", help="time through pytest-benchmark, one provider at a time")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's). 1 steadies timings on a busy machine")
    ap.add_argument("-k", default=None, help="with --via-pytest: pytest -k expression, e.g. 'vit_s and fwd_bwd'")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.quick:
        os.environ["ESTA_BENCH_QUICK"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)
    if args.threads:
        os.environ["ESTA_BENCH_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import platform

    import torch

    import esta_kernels

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} cores "
              f"(load average {load:.2f}), esta backends {esta_kernels.available_backends()}, "
              f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(header, flush=True)
    if load > 0.5 and torch.get_num_threads() > 1:
        print("warning: the machine is busy; every parallel region waits for all its threads, so timings "
              "jump by scheduler slices. Rerun when idle, or with --threads 1.", flush=True)
    rc = 0
    if args.via_pytest:
        rows, rc = run_pytest(rounds, warmup, args.quick, args.k, None)
        from bench.providers import PROVIDERS

        skipped = [(d, n, PROVIDERS[n].unavailable(d)) for d, _, names in _cases() for n in names
                   if PROVIDERS[n].unavailable(d)]
    else:
        rows, skipped = run_interleaved(rounds, warmup)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "method": "pytest-benchmark" if args.via_pytest else "interleaved",
                       "rounds": rounds, "warmup": warmup, "rows": rows, "skipped": skipped}, f, indent=1)
    print(f"\nmedians of {rounds} rounds after {warmup} warm-up "
          f"({'pytest-benchmark, one provider at a time' if args.via_pytest else 'providers interleaved'}); "
          "'x floor' = median / F.linear's in the same group")
    print(format_table(rows))
    if skipped:
        print("\nskipped:")
        for device, name, reason in skipped:
            print(f"  {device} {name}: {reason}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
