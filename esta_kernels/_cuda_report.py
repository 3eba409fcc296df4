"""Static report of the CUDA kernels in the built extension esta_kernels._C, read without a GPU.

For one target architecture, each kernel's matrix instructions (HGMMA: Hopper wgmma; HMMA: mma.sync),
TMA loads (UTMALDG) and resources (registers, stack, local memory, spill instructions), from the CUDA binary
utilities: `cuobjdump -res-usage` and `cuobjdump -sass`. The tools are looked up on PATH, in CUDA_HOME and
in the triton wheel (triton/backends/nvidia/bin), which CI installs.

    from esta_kernels._cuda_report import cuda_kernel_report
    cuda_kernel_report(90)          # list of dicts, one per kernel of the sm_90a code
    python -m esta_kernels._cuda_report [--arch 90]   # the same as a table
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
from typing import Optional

__all__ = ["cuda_kernel_report", "built_archs", "find_cuda_tool", "extension_path"]


def find_cuda_tool(name: str) -> Optional[str]:
    """Path of a CUDA binary utility (cuobjdump, nvdisasm), or None."""
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", name), os.X_OK):
            return os.path.join(home, "bin", name)
    spec = importlib.util.find_spec("triton")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "bin", name)
        if os.access(path, os.X_OK):
            return path
    return None


def extension_path() -> Optional[str]:
    """File of the built extension esta_kernels._C, or None when it is not built."""
    spec = importlib.util.find_spec("esta_kernels._C")
    return spec.origin if spec is not None else None


def built_archs(path: Optional[str] = None) -> list:
    """The GPU targets the extension holds code for, e.g. ['sm_80', 'sm_90a'] (empty for a CPU-only build)."""
    path = path or extension_path()
    cuobjdump = find_cuda_tool("cuobjdump")
    if path is None or cuobjdump is None:
        return []
    done = subprocess.run([cuobjdump, "--list-elf", path], capture_output=True, text=True, check=False)
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.", done.stdout)))


def _arch_names(arch: int) -> list:
    # the Hopper kernels are built for the arch-specific target sm_90a; accept a plain build too
    return [f"sm_{arch}a", f"sm_{arch}"] if arch >= 90 else [f"sm_{arch}"]


def _run(args: list) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


_RES_FUNC = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_RES_FIELD = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")
_SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")


def _resources(text: str) -> dict:
    out, current = {}, None
    for line in text.splitlines():
        m = _RES_FUNC.match(line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            out[current] = {k: int(v) for k, v in _RES_FIELD.findall(line)}
            current = None
    return out


def _sass_counts(text: str) -> dict:
    out, current = {}, None
    for line in text.splitlines():
        m = _SASS_FUNC.match(line)
        if m:
            current = m.group(1)
            out[current] = {"hgmma": 0, "utmaldg": 0, "hmma": 0, "ldl": 0, "stl": 0, "instructions": 0}
            continue
        if current is None or "/*" not in line:
            continue
        # an instruction line: "/*0a10*/  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], ..." (optionally predicated)
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m:
            continue
        op = m.group(1).split(".")[0]
        c = out[current]
        c["instructions"] += 1
        if op == "HGMMA":
            c["hgmma"] += 1
        elif op == "UTMALDG":
            c["utmaldg"] += 1
        elif op == "HMMA":
            c["hmma"] += 1
        elif op == "LDL":
            c["ldl"] += 1
        elif op == "STL":
            c["stl"] += 1
    return out


def _demangle(names: list) -> dict:
    tool = shutil.which("c++filt") or find_cuda_tool("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False)
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines))


def _kind(mangled: str) -> str:
    """What the kernel is in the stitched linear, from its mangled name."""
    if "TwoSegmentMainloop" in mangled:
        return "hopper_forward" if "BiasStitchGather" in mangled else "hopper_dgrad"
    if "sm8011gemm_kernel" in mangled:
        return "ampere_gemm"
    for key in ("simt_gemm_kernel", "lora_onehot_kernel", "split_sum_kernel", "check_ids_kernel", "scan_ids_kernel"):
        if key in mangled:
            return key.replace("_kernel", "")
    if "lstsq" in mangled:
        return "lstsq"
    return "other"


def _dtype(mangled: str) -> Optional[str]:
    if "bfloat16" in mangled or "DtypeE2E" in mangled:
        return "bf16"
    if "half_t" in mangled or "DtypeE1E" in mangled:
        return "f16"
    if "DtypeE0E" in mangled:
        return "f32"
    return None


def cuda_kernel_report(arch: int = 90, path: Optional[str] = None) -> list:
    """One dict per CUDA kernel of the built extension's code for `arch` (90: sm_90a, 80: sm_80):

    name (demangled when c++filt is found), mangled, kind (hopper_forward, hopper_dgrad, ampere_gemm,
    simt_gemm, ..., other), dtype, arch, registers, stack_bytes, local_bytes, shared_bytes (static),
    hgmma, utmaldg, hmma (instruction counts), uses_hgmma, uses_tma, spill_instructions (LDL + STL) and
    spills: any local memory or LDL/STL instruction (register spills, a local array, or the stack buffer of a
    printf's arguments: check_ids_kernel, the one kernel that prints, shows True for that reason).

    Raises RuntimeError when the extension has no CUDA code for that architecture or cuobjdump is missing.
    """
    path = path or extension_path()
    if path is None:
        raise RuntimeError("esta_kernels._C is not built")
    cuobjdump = find_cuda_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit, or the triton wheel's backends/nvidia/bin)")
    listing = _run([cuobjdump, "--list-elf", path])
    names = [a for a in _arch_names(arch) if f".{a}." in listing]
    if not names:
        raise RuntimeError(f"{path} has no code for sm_{arch} (its ELF files: {listing.split()})")
    target = names[0]
    resources = _resources(_run([cuobjdump, "-res-usage", "-arch", target, path]))
    counts = _sass_counts(_run([cuobjdump, "-sass", "-arch", target, path]))
    mangled = sorted(set(resources) | set(counts))
    demangled = _demangle(mangled)
    report = []
    for name in mangled:
        res = resources.get(name, {})
        c = counts.get(name, {"hgmma": 0, "utmaldg": 0, "hmma": 0, "ldl": 0, "stl": 0, "instructions": 0})
        spill_instructions = c["ldl"] + c["stl"]
        report.append({
            "name": demangled.get(name, name),
            "mangled": name,
            "kind": _kind(name),
            "dtype": _dtype(name),
            "arch": target,
            "registers": res.get("REG"),
            "stack_bytes": res.get("STACK"),
            "local_bytes": res.get("LOCAL"),
            "shared_bytes": res.get("SHARED"),
            "instructions": c["instructions"],
            "hgmma": c["hgmma"],
            "utmaldg": c["utmaldg"],
            "hmma": c["hmma"],
            "uses_hgmma": c["hgmma"] > 0,
            "uses_tma": c["utmaldg"] > 0,
            "spill_instructions": spill_instructions,
            "spills": bool(res.get("LOCAL", 0)) or spill_instructions > 0,
        })
    return report


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="target architecture: 90 (sm_90a) or 80")
    args = parser.parse_args()
    rows = cuda_kernel_report(args.arch)
    print(f"{'kind':<18} {'dtype':<5} {'regs':>4} {'stack':>5} {'local':>5} {'HGMMA':>5} {'UTMALDG':>7} {'HMMA':>5} "
          f"{'spills':>6}  name")
    for r in rows:
        short = r["name"] if len(r["name"]) <= 70 else r["name"][:67] + "..."
        print(f"{r['kind']:<18} {r['dtype'] or '-':<5} {r['registers']!s:>4} {r['stack_bytes']!s:>5} "
              f"{r['local_bytes']!s:>5} {r['hgmma']:>5} {r['utmaldg']:>7} {r['hmma']:>5} {str(r['spills']):>6}  {short}")


if __name__ == "__main__":
    _main()
