"""Multi-process CPU (gloo) tests: run a test module's `_worker(rank, world, store, out)` on `world` processes."""
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT


def launch_ranks(module: str, tmp_path, world: int, timeout: float, what: str = "distributed run"):
    """Runs `module._worker(rank, world, store, out)` in `world` processes (one thread each) and returns
    (each rank's torch-saved result, the result paths). Kills every rank on a timeout; a rank that fails
    fails the test with the tail of its log."""
    store = str(tmp_path / "store")
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    procs = []
    for r in range(world):
        code = f"import {module} as t; t._worker({r}, {world}, {store!r}, {outs[r]!r})"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"{what} did not finish in {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-6000:]}"
    return [torch.load(o, weights_only=False) for o in outs], outs


def publish_result(result, out: str) -> None:
    """Inside a rank: saves `result` to `out` atomically (what launch_ranks reads back), then waits for every
    rank, so no rank tears the process group down while another still saves."""
    import torch.distributed as dist

    torch.save(result, out + ".tmp")
    os.replace(out + ".tmp", out)
    dist.barrier()
