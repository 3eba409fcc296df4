"""Static evidence for the `cuda` backend's kernels, without a GPU: the built extension is disassembled
(esta_kernels._cuda_report, cuobjdump) and the Hopper forward and dx kernels must run on wgmma (HGMMA)
with TMA loads (UTMALDG) and no register spills; the Ampere-class kernels on mma.sync (HMMA), no spills.

Skipped when the extension was built without CUDA kernels, unless ESTA_BUILD_CUDA=1 asked for them (CI).
"""
import os

import pytest
import torch

from esta_kernels import _ext
from esta_kernels._cuda_report import built_archs, cuda_kernel_report, extension_path, find_cuda_tool

ASKED = os.environ.get("ESTA_BUILD_CUDA", "").lower() == "1"


def _require_cuda_build():
    if not _ext.HAS_EXTENSION:
        if ASKED:
            pytest.fail(f"ESTA_BUILD_CUDA=1 but esta_kernels._C does not load: {_ext.EXTENSION_ERROR}")
        pytest.skip(f"esta_kernels._C is not built: {_ext.EXTENSION_ERROR}")
    if not _ext.has_cuda_kernels():
        if ASKED and torch.version.cuda is not None:
            pytest.fail("ESTA_BUILD_CUDA=1 but esta_kernels._C has no CUDA kernels: rebuild the extension")
        pytest.skip("esta_kernels._C was built without CUDA kernels (set ESTA_BUILD_CUDA=1)")
    if find_cuda_tool("cuobjdump") is None:
        pytest.fail("cuobjdump not found (install the CUDA toolkit or triton, whose wheel ships it)")


def _expects(arch: str) -> bool:
    """Whether the build was asked for this target (CI: TORCH_CUDA_ARCH_LIST=8.0;9.0, setup.py's default)."""
    return arch in os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")


def _report(sm: str, asked: str, arch: int):
    """cuda_kernel_report(arch) of the built extension; a failure when TORCH_CUDA_ARCH_LIST asked for `asked`
    but the build holds no `sm` code, a skip when it was not asked for."""
    _require_cuda_build()
    archs = built_archs()
    if sm not in archs:
        if ASKED and _expects(asked):
            pytest.fail(f"TORCH_CUDA_ARCH_LIST asks for {asked} but the extension holds code for {archs} only, "
                        f"not {sm}")
        pytest.skip(f"the extension was built for {archs}: no {sm} code to inspect")
    return cuda_kernel_report(arch)


@pytest.fixture(scope="module")
def hopper_report():
    return _report("sm_90a", "9.0", 90)


@pytest.fixture(scope="module")
def ampere_report():
    return _report("sm_80", "8.0", 80)


def _describe(k):
    return (f"{k['kind']} {k['dtype']}: {k['registers']} registers, local {k['local_bytes']} B, "
            f"{k['spill_instructions']} spill instructions, HGMMA {k['hgmma']}, UTMALDG {k['utmaldg']}, "
            f"HMMA {k['hmma']}")


@pytest.mark.parametrize("kind", ["hopper_forward", "hopper_dgrad"])
@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_hopper_kernels_use_wgmma_and_tma_without_spills(hopper_report, kind, dtype):
    found = [k for k in hopper_report if k["kind"] == kind and k["dtype"] == dtype]
    assert len(found) == 1, f"expected one sm_90a {kind} {dtype} kernel, found {[k['name'][:80] for k in found]}"
    k = found[0]
    assert k["arch"] == "sm_90a", f"{kind} {dtype} was compiled for {k['arch']}, not the wgmma target sm_90a"
    assert k["uses_hgmma"], f"no HGMMA (wgmma) in the Hopper {kind} kernel: {_describe(k)}"
    assert k["uses_tma"], f"no UTMALDG (TMA load) in the Hopper {kind} kernel: {_describe(k)}"
    assert k["hmma"] == 0, f"the Hopper {kind} kernel also runs mma.sync: {_describe(k)}"
    assert not k["spills"] and k["stack_bytes"] == 0, f"the Hopper {kind} kernel spills: {_describe(k)}"


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_ampere_kernels_use_mma_sync_without_spills(ampere_report, dtype):
    found = [k for k in ampere_report if k["kind"] == "ampere_gemm" and k["dtype"] == dtype]
    assert len(found) == 3, f"expected the three sm_80 GEMM layouts for {dtype}, found {len(found)}"
    for k in found:
        assert k["hmma"] > 0 and k["hgmma"] == 0, _describe(k)
        assert not k["spills"] and k["stack_bytes"] == 0, f"spills: {_describe(k)}"


def test_no_cuda_kernel_spills(hopper_report, ampere_report):
    # check_ids is exempt: it is the one kernel that calls printf, whose argument buffer lives on the stack
    spilling = [_describe(k) for k in hopper_report + ampere_report if k["kind"] != "check_ids" and k["spills"]]
    assert not spilling, f"kernels with local memory or spill instructions: {spilling}"


def test_report_lists_every_kernel_family(hopper_report):
    kinds = {k["kind"] for k in hopper_report}
    for kind in ("hopper_forward", "hopper_dgrad", "ampere_gemm", "simt_gemm", "lora_onehot", "split_sum",
                 "check_ids"):
        assert kind in kinds, f"{kind} missing from the sm_90a report of {extension_path()}: {sorted(kinds)}"
    for k in hopper_report:
        assert k["registers"] is not None and k["instructions"] > 0, k["name"]
