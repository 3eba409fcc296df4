"""The GPU correctness matrix (tests/helpers/gpu_matrix.py): r in {1, 2, 3, 8, 16, 256} x M in {1, 7, 130, 4099} x
{float16, bfloat16, float32} x {no ids, one int id, per-row ids with -1s} x {Hopper path, pointer path},
forward and backward against the float64 reference. Each (path, dtype) group runs in its own process, all
groups at once, so a CUDA fault (sticky for its process) costs only the rest of its own group and is
reported by name."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

HARNESS = [sys.executable, "-m", "tests.helpers.gpu_matrix"]  # run from the repository root
GROUPS = [(path, dtype) for path in ("tma", "pointer") for dtype in ("float16", "bfloat16", "float32")]

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def matrix_results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {g: subprocess.Popen(HARNESS + ["--path", g[0], "--dtype", g[1]], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for g in GROUPS}
    out = {}
    for g, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=float(os.environ.get("ESTA_GPU_MATRIX_TIMEOUT", "300")))
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
            stderr += "\n(timed out)"
        rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        out[g] = (p.returncode, rows, stderr[-3000:])
    return out


@pytest.mark.parametrize("path,dtype", GROUPS, ids=[f"{p}-{d}" for p, d in GROUPS])
@gpu[0]
@gpu[1]
def test_gpu_matrix_group(matrix_results, path, dtype):
    rc, rows, stderr = matrix_results[(path, dtype)]
    if rows and rows[0].get("status") == "skipped":
        pytest.skip(rows[0]["reason"])
    bad = [r for r in rows if r.get("status") not in ("ok",)]
    cases = [r for r in rows if "r" in r]
    assert cases, f"group {path}/{dtype} ran no case (exit {rc}):\n{stderr}"
    assert not bad, f"group {path}/{dtype}: {len(bad)} bad of {len(cases)}:\n" + "\n".join(
        json.dumps({k: v for k, v in r.items() if k != "traceback"}) for r in bad[:20])
    assert len(cases) == 6 * 4 * 3, f"group {path}/{dtype} ran {len(cases)} of 72 cases (exit {rc}):\n{stderr}"
    want = "tma" if path == "tma" and dtype != "float32" else "pointer"
    assert all(r["plan_path"] == want for r in cases), f"{path}/{dtype}: unexpected dispatch"
    assert rc == 0


@pytest.mark.interpreter
@pytest.mark.parametrize("path", ["tma", "pointer"])
def test_gpu_matrix_harness_runs_in_the_interpreter(path):
    """The harness itself (case loop, reference checks, JSON lines) on a few cases in Triton's interpreter,
    so the GPU run cannot fail on the harness."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(HARNESS + ["--device", "cpu", "--path", path,
                          "--dtype", "float16", "--r", "1,20", "--M", "7", "--ids", "rows,int"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert res.returncode == 0 and len(rows) == 4, res.stdout[-2000:] + res.stderr[-2000:]
    assert all(r["status"] == "ok" and r["plan_path"] == path for r in rows), rows
