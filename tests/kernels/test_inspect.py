"""`python -m esta_kernels.inspect`: the static kernel report, compiled for sm_90 without a GPU.

For the bfloat16 LLaMA q_proj and ViT-B qkv shapes (esta_kernels/shapes.py), with float32 master factors (the
autocast training case) and with factors in x's dtype: the forward's main kernel and the backward's dx
kernel use wgmma and TMA and spill nothing, and the d lora_b / d stitch_bias pass uses wgmma.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from tests.helpers import ROOT  # noqa: E402


def _inspect(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "esta_kernels.inspect", *args], env=env, capture_output=True,
                          text=True, timeout=900, cwd=ROOT)


@pytest.mark.parametrize("params", ["fp32", "same"])
def test_static_report_main_kernels_use_wgmma_and_tma_without_spills(tmp_path, params):
    res = _inspect(tmp_path, "--arch", "90", "--json", "--params", params, "--shapes", "llama7b_q_proj,vit_b_qkv")
    assert res.returncode == 0, res.stderr[-4000:]
    rep = json.loads(res.stdout)
    assert rep["arch"] == 90 and rep["dtype"] == "bfloat16"
    rows = rep["rows"]
    assert all(r["ok"] for r in rows), [r.get("error") for r in rows if not r["ok"]]
    for shape in ("llama7b_q_proj", "vit_b_qkv"):
        by_launch = {r["launch"]: r for r in rows if r["shape"] == shape}
        # g = scale dy B is computed by the dx launch's g jobs (no launch of its own)
        assert set(by_launch) == {"fwd-xa", "fwd-y", "bwd-dx", "bwd-dlora_b+dstitch", "bwd-dlora_a"}
        for name, path in (("fwd-y", "tma"), ("bwd-dx", "tma-fused-g")):
            r = by_launch[name]
            assert r["path"] == path and r["kernel"] == "_persistent_gemm_kernel", (shape, name, r)
            assert r["wgmma"] and r["tma"], (shape, name, r)
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["regs"] and r["regs"] <= 255, \
                (shape, name, r)
        assert by_launch["bwd-dlora_b+dstitch"]["wgmma"], (shape, by_launch["bwd-dlora_b+dstitch"])
        assert all(r["smem"] <= 227 * 1024 for r in by_launch.values()), shape  # an H100/H200 block's limit
        assert not any(r["mma_sync"] and not r["wgmma"] for r in by_launch.values()), shape


def test_table_output_and_interpreter_refusal(tmp_path):
    res = _inspect(tmp_path, "--shapes", "vit_b_qkv")
    assert res.returncode == 0, res.stderr[-4000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith("esta kernel report: sm_90, bfloat16")
    assert sum(" vit_b_qkv " in f" {ln} " for ln in lines) == 5
    # ESTA_TRITON_G=thin's launches: g by its own thin launch, then the plain dx
    res = _inspect(tmp_path, "--shapes", "vit_b_qkv", "--g", "thin", "--json")
    assert res.returncode == 0, res.stderr[-4000:]
    launches = {r["launch"]: r for r in json.loads(res.stdout)["rows"]}
    assert {"bwd-g", "bwd-dx"} <= set(launches) and launches["bwd-dx"]["path"] == "tma"
    assert all(launches[n]["wgmma"] and launches[n]["tma"] and launches[n]["spill_stores"] == 0
               for n in ("bwd-g", "bwd-dx")), launches
    env = dict(os.environ, TRITON_INTERPRET="1")
    bad = subprocess.run([sys.executable, "-m", "esta_kernels.inspect"], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "TRITON_INTERPRET=1" in bad.stderr
