#!/usr/bin/env python3
"""Last step of bench/gpu_check.sh: one JSON summary of the run, and the table printed last.

    python3 bench/gpu_report.py --work DIR --out DIR [--build-status S --build-seconds T ...]

Reads what the earlier steps left in --work (gpu_bench.json, junit.xml, pytest.log, build.log) and writes
--out/<card>-<YYYY-MM-DD>.json (e.g. h100-2026-11-27.json; -2, -3, ... when that name is taken) with the
card, driver, versions, build status and time, gpu test counts and failures, and the benchmark results.
The full build and pytest logs are copied beside it as <name>.build.log and <name>.pytest.log.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _tail(path: str, n: int) -> list:
    try:
        with open(path, errors="replace") as f:
            return [ln.rstrip("\n") for ln in f.readlines()[-n:]]
    except OSError:
        return []


def test_counts(work: str, test_rc) -> dict:
    """Counts from pytest's junit XML when it exists, else from the summary line of its log."""
    out = {"exit_code": test_rc}
    if test_rc == 124 or test_rc == 137:
        out["status"] = "timeout"
    junit = os.path.join(work, "junit.xml")
    if os.path.exists(junit):
        try:
            root = ET.parse(junit).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            out.update(total=tot["tests"], failed=tot["failures"], errors=tot["errors"], skipped=tot["skipped"],
                       passed=tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"])
            bad = []
            for case in root.iter("testcase"):
                for kind in ("failure", "error"):
                    el = case.find(kind)
                    if el is not None:
                        msg = (el.get("message") or "").strip().splitlines()
                        bad.append(f"{kind.upper()} {case.get('classname')}::{case.get('name')}: "
                                   f"{msg[0][:300] if msg else ''}")
            out["failures"] = bad[:60]
        except ET.ParseError as exc:
            out["junit_error"] = str(exc)
    log = _tail(os.path.join(work, "pytest.log"), 400)
    summary = next((ln for ln in reversed(log) if re.search(r"\b(passed|failed|error|errors|skipped|deselected|"
                                                              r"collected|selected|no tests ran)\b", ln)), None)
    out["summary_line"] = summary.strip("= ").strip() if summary else None
    if "total" not in out and summary:
        for num, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|tests? collected|selected)", summary):
            key = {"error": "errors", "test collected": "collected", "tests collected": "collected"}.get(word, word)
            out[key] = int(num)
    out.setdefault("status", "ok" if test_rc in (0, 5) and not out.get("failed") and not out.get("errors")
                   else ("not run" if test_rc is None else "failed"))
    out["log_tail"] = log[-80:]
    return out


def sanitizer_verdict(work: str, rc, seconds) -> dict:
    """compute-sanitizer memcheck of the once-crashing cases: per (path, dtype) its exit code, its ERROR
    SUMMARY line and the cases the harness reported; `verdict` is clean / errors / not run."""
    out = {"exit_code": rc, "seconds": seconds, "cases": []}
    for path in ("tma", "pointer"):
        for dtype in ("float16", "bfloat16"):
            log = os.path.join(work, f"sanitizer-{path}-{dtype}.log")
            if not os.path.exists(log):
                continue
            lines = _tail(log, 400)
            code = _tail(os.path.join(work, f"sanitizer-{path}-{dtype}.rc"), 1)
            summary = next((ln.strip() for ln in reversed(lines) if "ERROR SUMMARY" in ln), "no ERROR SUMMARY line")
            results = []
            for ln in lines:
                if ln.startswith("{"):
                    try:
                        results.append(json.loads(ln))
                    except ValueError:
                        pass
            out["cases"].append({"path": path, "dtype": dtype, "exit_code": code[0] if code else None,
                                 "summary": summary,
                                 "results": [{k: r.get(k) for k in ("r", "M", "ids", "status", "plan_path", "errors",
                                                                    "error")} for r in results]})
    repro = os.path.join(work, "sanitizer-pre13-float16.log")
    if os.path.exists(repro):
        lines = _tail(repro, 400)
        events = []
        for ln in lines:
            if ln.startswith("{"):
                try:
                    events.append(json.loads(ln))
                except ValueError:
                    pass
        started = [e["launch"] for e in events if "launch" in e]
        done = [e["done"] for e in events if "done" in e]
        code = _tail(os.path.join(work, "sanitizer-pre13-float16.rc"), 1)
        out["pre13_repro"] = {
            "what": "bench/repro/r1_crash.py: the pre-issue-13 kernels, r=1, M=7, float16, unpadded (M, 1) buffers",
            "exit_code": code[0] if code else None,
            "summary": next((ln.strip() for ln in reversed(lines) if "ERROR SUMMARY" in ln), "no ERROR SUMMARY line"),
            "launches_started": started, "launches_done": done,
            "faulting_launch": started[len(done)] if len(started) > len(done) else None,
            "first_error_lines": [ln for ln in lines if ln.startswith("=========")][:12],
        }
    if not out["cases"]:
        out["verdict"] = "not run"
    elif all(c["summary"].startswith("========= ERROR SUMMARY: 0 errors") and c["exit_code"] == "0"
             for c in out["cases"]):
        out["verdict"] = "clean"
    else:
        out["verdict"] = "errors (see sanitizer.log)"
    return out


def card_slug(card: str | None, mode: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; the CPU dry run -> 'cpu-dry-run'."""
    if mode == "cpu-dry-run":
        return "cpu-dry-run"
    m = re.search(r"\b((?:RTX|GTX)\s?[A-Z]?\d{3,4}\w*|[A-Za-z]{1,4}\d{2,4}[A-Za-z]?)\b", card or "")
    return re.sub(r"\s", "", m.group(1)).lower() if m else re.sub(r"[^a-z0-9]+", "-", (card or "gpu").lower()).strip("-") or "gpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="gpu", choices=("gpu", "cpu-dry-run"))
    ap.add_argument("--build-status", default="not run")
    ap.add_argument("--build-seconds", type=float, default=None)
    ap.add_argument("--build-method", default=None)
    ap.add_argument("--test-rc", type=int, default=None)
    ap.add_argument("--test-seconds", type=float, default=None)
    ap.add_argument("--bench-rc", type=int, default=None)
    ap.add_argument("--bench-seconds", type=float, default=None)
    ap.add_argument("--total-seconds", type=float, default=None)
    ap.add_argument("--sanitizer-rc", type=int, default=None, help="worst exit code of the memcheck runs")
    ap.add_argument("--sanitizer-seconds", type=float, default=None)
    ap.add_argument("--backends", default=None, help="esta_kernels.available_backends() after the build")
    args = ap.parse_args(argv)

    bench_path = os.path.join(args.work, "gpu_bench.json")
    bench = None
    if os.path.exists(bench_path):
        with open(bench_path) as f:
            bench = json.load(f)
    env = (bench or {}).get("environment", {})
    if not env:
        from bench.gpu_bench import environment
        import torch

        env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    summary = {
        "mode": args.mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": env.get("card"),
        "driver": env.get("driver"),
        "versions": {k: env.get(k) for k in ("python", "torch", "torch_cuda", "triton")},
        "git_commit": env.get("git_commit"),
        "esta_backends": args.backends or env.get("esta_backends"),
        "build": {"status": args.build_status, "seconds": args.build_seconds, "method": args.build_method,
                  "log_tail": _tail(os.path.join(args.work, "build.log"), 40)},
        "gpu_tests": dict(test_counts(args.work, args.test_rc), seconds=args.test_seconds),
        "bench_run": {"exit_code": args.bench_rc, "seconds": args.bench_seconds,
                      "log_tail": _tail(os.path.join(args.work, "bench.log"), 40)},
        "sanitizer": sanitizer_verdict(args.work, args.sanitizer_rc, args.sanitizer_seconds),
        "total_seconds": args.total_seconds,
        "bench": bench,
    }

    os.makedirs(args.out, exist_ok=True)
    stem = f"{card_slug(env.get('card'), args.mode)}-{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
    name, i = stem, 2
    while os.path.exists(os.path.join(args.out, name + ".json")):
        name, i = f"{stem}-{i}", i + 1
    path = os.path.join(args.out, name + ".json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    for log in ("build", "pytest", "bench", "sanitizer"):
        src = os.path.join(args.work, log + ".log")
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(args.out, f"{name}.{log}.log"))

    # ---- printed last: what the session reads from the device's output tail
    t = summary["gpu_tests"]
    b = summary["build"]
    print()
    print(f"== esta GPU check ({args.mode}): {summary['card']} | driver {summary['driver']} | "
          f"torch {env.get('torch')} | triton {env.get('triton')}")
    print(f"build: {b['status']}" + (f" in {b['seconds']:.0f} s" if b["seconds"] is not None else "")
          + (f" ({b['method']})" if b["method"] else "") + f" | backends {summary['esta_backends']}")
    san = summary["sanitizer"]
    print(f"memcheck (r=1, M=7, fp16/bf16, both paths): {san['verdict']}"
          + "".join(f" | {c['path']}/{c['dtype']}: {c['summary']}" for c in san.get("cases", [])))
    if san.get("pre13_repro"):
        rp = san["pre13_repro"]
        print(f"pre-13 r=1 repro: exit {rp['exit_code']}, {rp['summary']}, faulting launch {rp['faulting_launch']}")
    print(f"gpu tests: {t.get('status')} | {t.get('summary_line')}")
    for line in t.get("failures", [])[:15]:
        print("  " + line[:200])
    if bench and bench.get("ceiling") and "matmul" in bench["ceiling"]:
        c = bench["ceiling"]
        print(f"ceiling: {c['matmul']['dtype']} matmul {c['matmul']['tflops']:.1f} TFLOP/s | "
              f"copy {c['copy']['gb_per_s']:.0f} GB/s")
    print(f"summary: {path}" + (f" | total {args.total_seconds:.0f} s" if args.total_seconds is not None else ""))
    if bench:
        from bench.gpu_bench import format_table

        print(format_table(bench))
    else:
        print(f"no benchmark results (gpu_bench exit code {args.bench_rc}); see {name}.bench.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
