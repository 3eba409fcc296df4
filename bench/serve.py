"""Palette serving against separate exports, and a load test of `esta serve`.

    python -m bench.serve --run esta-demo                  # CPU: ~3 minutes on 2 idle cores
    python -m bench.serve --run esta-demo --threads 1      # steadier when other work shares the machine
    python -m bench.serve --run esta-demo --device cuda    # the GPU check's part (set-ups and server on the GPU)
    python -m bench.serve --run RUN --quick                # checks the harness in seconds, measures nothing

The run: a trained and deployed run directory (`esta demo` makes one: 6 deployed members of three ViTs).
Requests: one example each (random, the run's example shape), for a member drawn uniformly from the deployed
members (seeded, the same sequence for every set-up).

Three set-ups serve the same request stream, side by side, in one process:
  (a) exports, one at a time   each deployed member's export (`esta.export.load` of RUN/export/stitch-i),
                               every request alone through its member's model, first come first served
  (b) exports, grouped         the requests waiting are grouped by member; each group runs through its
                               member's export as one batch, group after group
  (c) palette, mixed           the requests waiting run as one mixed-stitch batch through
                               `esta.serving.Palette` (one forward, whatever the members)
Closed loop at concurrency C: C requests are outstanding at all times (a finished request is replaced at
once by the next of the stream, arriving then); (b) and (c) take every waiting request, up to --max-batch,
per step. Latency = finish - arrival. Throughput = requests / wall time. The set-ups take turns in rounds
(order rotated), so a load that drifts over the run hits all alike. Before anything is timed, the palette's
mixed outputs are checked against every export (float32, 1e-5): a wrong palette is not timed.

Summary at a latency bound: for each set-up, the highest throughput over the concurrencies whose p99
latency stays within the bound (--latency-bound-ms; default 10x the median latency of one request alone
through its export, measured here first: a machine-relative bound).

Resident weight bytes: every distinct storage of the parameters and buffers the set-up holds to serve all
deployed members (six exports for (a) and (b); the palette for (c)), against the anchors' own bytes (their
frozen weights, norms, embeddings and heads, without the LoRA and bias tables training added).

Load test (`--load`, on by default): `esta serve --run RUN --port 0` in a subprocess on 127.0.0.1; K client
threads with keep-alive connections send --load-requests requests (two thirds by member, one third by an
MFLOPs budget), bounded by --load-seconds; then one request of each bad kind (each must get a 4xx), a last
good request (the server kept serving), and SIGTERM (a graceful stop, exit 0).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import esta.export  # noqa: E402
from esta.serving import Palette  # noqa: E402
from esta.serving.palette import module_bytes  # noqa: E402


_CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = time.perf_counter


def _percentile(values: List[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


class Setup:
    """One way of serving: run(list of (index, member)) -> when each finished (a per-request time)."""

    def __init__(self, name, step):
        self.name, self.step = name, step


def _make_setups(palette, exports, inputs, device, max_batch):
    def one_at_a_time(batch):
        done = []
        for k, m in batch[:1]:
            out = exports[m](inputs[k:k + 1])
            out.cpu()
            done.append(_clock())
        return done, 1

    def grouped(batch):
        groups: Dict[int, List[int]] = {}
        for k, m in batch:
            groups.setdefault(m, []).append(k)
        finish = {}
        for m, ks in groups.items():
            idx = torch.tensor(ks, device=device)
            out = exports[m](inputs.index_select(0, idx))
            out.cpu()
            t = _clock()
            for k in ks:
                finish[k] = t
        return [finish[k] for k, _ in batch], len(batch)

    def mixed(batch):
        idx = torch.tensor([k for k, _ in batch], device=device)
        out = palette(inputs.index_select(0, idx), [m for _, m in batch])
        out.cpu()
        t = _clock()
        return [t] * len(batch), len(batch)

    return [Setup("a: exports, one at a time", one_at_a_time), Setup("b: exports, grouped per member", grouped),
            Setup("c: palette, mixed batches", mixed)]


def _closed_loop(setup, stream, start, count, concurrency, max_batch):
    """Serves requests stream[start:start+count] with `concurrency` outstanding; returns latencies and time."""
    t0 = _clock()
    pending = [(start + i, stream[start + i], t0) for i in range(min(concurrency, count))]
    issued = len(pending)
    latencies = []
    while pending:
        take = pending[:max_batch]
        done, n = setup.step([(k, m) for k, m, _ in take])
        served, pending = take[:n], take[n:] + pending[max_batch:]
        for (k, m, arrived), finished in zip(served, done):
            latencies.append(finished - arrived)
        for finished in done:
            if issued < count:
                pending.append((start + issued, stream[start + issued], finished))
                issued += 1
    return latencies, _clock() - t0


def compare(palette, exports, device, *, requests, concurrencies, max_batch, rounds, seed, bound_ms):
    members = sorted(exports)
    g = torch.Generator().manual_seed(seed)
    stream = [members[int(i)] for i in torch.randint(0, len(members), (requests * rounds + 64,), generator=g)]
    inputs = torch.randn((len(stream),) + palette.example_shape, generator=g).to(device, palette.dtype)
    setups = _make_setups(palette, exports, inputs, device, max_batch)
    # the palette must equal the exports before anything is timed
    check = list(range(min(48, len(stream))))
    mixed = palette(inputs[check], [stream[k] for k in check])
    worst = 0.0
    for k in check:
        worst = max(worst, float((exports[stream[k]](inputs[k:k + 1]) - mixed[k:k + 1]).abs().max()))
    if not worst <= 1e-5:
        raise SystemExit(f"bench.serve: the palette differs from the exports by {worst:.3g} (> 1e-5); not timing it")
    with torch.no_grad():
        for s in setups:  # warm-up: every set-up at every concurrency (batch shapes; autotuning on a GPU)
            for c in concurrencies:
                _closed_loop(s, stream, 0, 2 * c, c, max_batch)
        # the machine-relative latency bound: one request alone through its export
        alone = _closed_loop(setups[0], stream, 0, 2 * len(members) * 4, 1, 1)[0]
        single_ms = 1e3 * statistics.median(alone)
        bound = bound_ms if bound_ms is not None else 10 * single_ms
        rows = []
        for c in concurrencies:
            lat = {s.name: [] for s in setups}
            wall = {s.name: 0.0 for s in setups}
            for r in range(rounds):
                order = setups[r % 3:] + setups[:r % 3]
                for s in order:
                    got, seconds = _closed_loop(s, stream, r * requests, requests, c, max_batch)
                    lat[s.name] += got
                    wall[s.name] += seconds
            for s in setups:
                v = lat[s.name]
                rows.append({"setup": s.name, "concurrency": c, "requests": len(v),
                             "throughput_rps": len(v) / wall[s.name], "p50_ms": 1e3 * _percentile(v, 50),
                             "p99_ms": 1e3 * _percentile(v, 99)})
    summary = {}
    for s in setups:
        ok = [r for r in rows if r["setup"] == s.name and r["p99_ms"] <= bound]
        best = max(ok, key=lambda r: r["throughput_rps"]) if ok else None
        summary[s.name] = best
    return {"check_max_abs_diff": worst, "single_request_ms": single_ms, "latency_bound_ms": bound,
            "rows": rows, "best_within_bound": summary}


# ------------------------------------------------------------------------------------------ load test
def _post(conn, body):
    data = json.dumps(body).encode()
    conn.request("POST", "/predict", body=data, headers={"Content-Type": "application/json",
                                                         "Content-Length": str(len(data))})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def load_test(run, *, device, requests, clients, seconds, threads, max_batch, max_wait_ms, seed):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "esta", "serve", "--run", run, "--port", "0", "--max-batch-size", str(max_batch),
           "--max-wait-ms", str(max_wait_ms), "--device", str(device)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = []
    try:
        url = None
        deadline = time.time() + 600
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            log.append(line.rstrip())
            if "listening on " in line:
                url = line.split("listening on ")[1].split()[0]
        if url is None:
            raise SystemExit("bench.serve: esta serve did not start:\n" + "\n".join(log))
        host, port = url.replace("http://", "").split(":")
        port = int(port)
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request("GET", "/palette")
        info = json.loads(conn.getresponse().read())
        members = [m for m in info["members"] if m["deployed"]]
        shape = info["example_shape"]
        g = torch.Generator().manual_seed(seed)
        example = torch.randn(shape, generator=g).tolist()
        lock = threading.Lock()
        results = []
        counter = [0]
        stop_at = time.perf_counter() + seconds

        def client(cid):
            c = http.client.HTTPConnection(host, port, timeout=60)
            rng = torch.Generator().manual_seed(seed + 1 + cid)
            while True:
                with lock:
                    if counter[0] >= requests or time.perf_counter() > stop_at:
                        break
                    counter[0] += 1
                pick = members[int(torch.randint(0, len(members), (1,), generator=rng))]
                if int(torch.randint(0, 3, (1,), generator=rng)) == 0:
                    body = {"mflops": pick["mflops"] * 1.0001, "inputs": example}
                else:
                    body = {"member": pick["id"], "inputs": example}
                t0 = time.perf_counter()
                try:
                    status, answer = _post(c, body)
                    ok = status == 200 and "outputs" in answer
                except Exception as e:  # a failed request is counted, never hidden
                    status, ok = repr(e), False
                    c.close()
                    c = http.client.HTTPConnection(host, port, timeout=60)
                with lock:
                    results.append((time.perf_counter() - t0, ok, status))
            c.close()

        t0 = time.perf_counter()
        workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        lat = [r[0] for r in results]
        failed = [r[2] for r in results if not r[1]]
        conn.request("GET", "/health")
        health = json.loads(conn.getresponse().read())
        bad = _bad_requests(host, port, members, example)
        conn = http.client.HTTPConnection(host, port, timeout=60)
        after = _post(conn, {"member": members[0]["id"], "inputs": example})[0]
        conn.close()
        t_stop = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        return {"requests": len(results), "clients": clients, "seconds": wall,
                "throughput_rps": len(results) / wall if wall else 0.0,
                "p50_ms": 1e3 * _percentile(lat, 50), "p99_ms": 1e3 * _percentile(lat, 99),
                "failed": len(failed), "failures": [str(f) for f in failed[:10]],
                "batches": health.get("batches"), "bad_requests": bad,
                "bad_all_4xx": all(isinstance(b["status"], int) and 400 <= b["status"] < 500 for b in bad),
                "served_after_bad_requests": after == 200, "shutdown_exit_code": proc.returncode,
                "shutdown_s": time.perf_counter() - t_stop, "server_log_tail": (log + rest.splitlines())[-4:]}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _bad_requests(host, port, members, example):
    too_big = b"[" + b"0," * 600_000 + b"0]"
    cases = [
        ("malformed JSON", b"{not json"),
        ("unknown member", {"member": 10_000, "inputs": example}),
        ("wrong input shape", {"member": members[0]["id"], "inputs": [[0.0, 1.0]]}),
        ("wrong input dtype (strings)", {"member": members[0]["id"],
                                         "inputs": [[["x"] * len(row) for row in plane] for plane in example]}),
        ("unsupported dtype", {"member": members[0]["id"], "inputs": example, "dtype": "float16"}),
        ("payload over the size limit", too_big),
        ("budget below the cheapest member", {"mflops": 1e-9, "inputs": example}),
    ]
    out = []
    for name, body in cases:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            conn.request("POST", "/predict", body=data, headers={"Content-Length": str(len(data))})
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            out.append({"case": name, "status": resp.status, "error": answer.get("error")})
        except Exception as e:
            out.append({"case": name, "status": repr(e), "error": None})
        conn.close()
    return out


# ------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a trained, deployed run directory (e.g. from `esta demo`)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=sorted(_CLOCKS), default="wall",
                   help="the in-process set-ups' clock: wall time, or the serving thread's CPU time (needs "
                        "--threads 1; on a machine shared with other work it leaves out the waiting for a core)")
    p.add_argument("--requests", type=int, default=240, help="requests per set-up, concurrency and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", default="1,6,16,32,64")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--latency-bound-ms", type=float, default=None)
    p.add_argument("--load", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--load-requests", type=int, default=600)
    p.add_argument("--load-clients", type=int, default=16)
    p.add_argument("--load-seconds", type=float, default=120.0)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny counts: checks the harness, measures nothing")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.concurrency = 12, 1, "1,4"
        args.load_requests, args.load_clients, args.load_seconds = 12, 2, 30.0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        raise SystemExit("bench.serve: --clock cpu measures the serving thread alone; pass --threads 1")
    global _clock
    _clock = _CLOCKS[args.clock]
    device = torch.device(args.device)
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    palette = Palette.from_run(args.run, device=device, log=None)
    exports = {m: esta.export.load(os.path.join(args.run, "export", f"stitch-{m}")).to(device)
               for m in palette.served}
    anchors = palette.source_anchor_bytes
    bytes_ = {"anchors_own": anchors, "anchors_used_by_deployed": palette.used_anchor_bytes,
              "a_b_exports": sum(module_bytes(e) for e in exports.values()), "c_palette": palette.resident_bytes()}
    print(f"bench.serve: {args.run}: deployed members {palette.served} on {device} "
          f"({torch.get_num_threads()} torch threads); "
          f"MFLOPs {[round(palette.members[m].mflops, 3) for m in palette.served]}")
    result = compare(palette, exports, device, requests=args.requests, concurrencies=concurrencies,
                     max_batch=args.max_batch, rounds=args.rounds, seed=args.seed, bound_ms=args.latency_bound_ms)
    load = None
    if args.load:
        load = load_test(args.run, device=device, requests=args.load_requests, clients=args.load_clients, seconds=args.load_seconds,
                         threads=args.threads, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, seed=args.seed)

    best = result["best_within_bound"]
    a, b, c = (best[k] for k in sorted(best))
    goals = {
        "resident_le_1.05x_anchors": bytes_["c_palette"] <= 1.05 * anchors,
        "mixed_ge_2x_one_at_a_time": bool(a and c and c["throughput_rps"] >= 2 * a["throughput_rps"]),
        "mixed_ge_grouped": bool(b and c and c["throughput_rps"] >= b["throughput_rps"]),
    }
    if load is not None:
        goals["load_zero_failed"] = load["failed"] == 0
        goals["bad_requests_all_4xx"] = load["bad_all_4xx"] and load["served_after_bad_requests"]
    out = {"run": os.path.abspath(args.run), "device": str(device), "clock": args.clock, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "members": palette.served, "bytes": bytes_,
           "compare": result, "load": load, "goals": goals, "quick": args.quick}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    _print(out)
    return out


def _print(out):
    r = out["compare"]
    print(f"\nclock: {out['clock']} ({'CPU time of the serving thread' if out['clock'] == 'cpu' else 'wall time'})")
    print(f"palette vs exports: max |diff| {r['check_max_abs_diff']:.2g} (float32); one request alone "
          f"{r['single_request_ms']:.2f} ms; latency bound {r['latency_bound_ms']:.1f} ms (p99)")
    print(f"\n{'set-up':<32} {'C':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for row in r["rows"]:
        print(f"{row['setup']:<32} {row['concurrency']:>4} {row['throughput_rps']:>9.1f} {row['p50_ms']:>8.2f} "
              f"{row['p99_ms']:>8.2f}")
    by = out["bytes"]
    print(f"\nresident weight bytes: anchors' own {by['anchors_own']:,}; (a)/(b) six exports {by['a_b_exports']:,} "
          f"({by['a_b_exports'] / by['anchors_own']:.2f}x); (c) palette {by['c_palette']:,} "
          f"({by['c_palette'] / by['anchors_own']:.3f}x)")
    print(f"\nbest throughput with p99 <= {r['latency_bound_ms']:.1f} ms:")
    for name, row in sorted(r["best_within_bound"].items()):
        print(f"  {name:<32} " + ("none within the bound" if row is None else
                                  f"{row['throughput_rps']:.1f} req/s at C={row['concurrency']} "
                                  f"(p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms)"))
    load = out["load"]
    if load is not None:
        print(f"\nload test (esta serve on 127.0.0.1, {load['clients']} clients): {load['requests']} requests in "
              f"{load['seconds']:.1f} s, {load['throughput_rps']:.1f} req/s, p50 {load['p50_ms']:.1f} ms, "
              f"p99 {load['p99_ms']:.1f} ms, failed {load['failed']}; batches {load['batches']}")
        for b in load["bad_requests"]:
            print(f"  bad request {b['case']:<34} -> {b['status']} {b['error']}")
        print(f"  served after the bad requests: {load['served_after_bad_requests']}; SIGTERM: exit "
              f"{load['shutdown_exit_code']} in {load['shutdown_s']:.2f} s")
    print("\ngoals: " + ", ".join(f"{k} {'MET' if v else 'NOT met'}" for k, v in out["goals"].items()))


if __name__ == "__main__":
    main()
