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
        assert set(by_launch) == {"fwd-xa", "fwd-y", "bwd-g", "bwd-dx", "bwd-dlora_b+dstitch", "bwd-dlora_a"}
        for name in ("fwd-y", "bwd-dx"):
            r = by_launch[name]
            assert r["path"] == "tma" and r["kernel"] == "_persistent_gemm_kernel", (shape, name, r)
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
    assert sum(" vit_b_qkv " in f" {ln} " for ln in lines) == 6
    env = dict(os.environ, TRITON_INTERPRET="1")
    bad = subprocess.run([sys.executable, "-m", "esta_kernels.inspect"], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "TRITON_INTERPRET=1" in bad.stderr
