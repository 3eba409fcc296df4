"""Backend selection: `torch` (reference), `cpu` (C++), `triton`, `cuda` (CUDA C++).

`backend="auto"` picks by device: on the CPU `cpu` (the C++ kernels) when built, else `torch`; on a GPU
`triton` when Triton is installed, else `cuda`, else `torch`. The environment variable ESTA_BACKEND, when
set, replaces `auto`; an explicit backend argument always wins.
"""
from __future__ import annotations

import os

import torch

from esta_kernels import _ext

BACKENDS = ("torch", "cpu", "triton", "cuda")


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Read once at import (triton itself reads TRITON_INTERPRET when first imported); plain constants also
# keep backend resolution traceable by torch.compile.
_HAS_TRITON = _probe_triton()
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return _HAS_TRITON


def triton_interpreter() -> bool:
    return _TRITON_INTERPRET


def available_backends() -> list:
    """The backends usable in this process, in the order of the table in docs/architecture.md ("Backends and
    dispatch")."""
    out = ["torch"]
    if _ext.has_cpu_kernels():
        out.append("cpu")
    if triton_installed() and (torch.cuda.is_available() or triton_interpreter()):
        out.append("triton")
    if _ext.has_cuda_kernels() and torch.cuda.is_available():
        out.append("cuda")
    return out


def resolve_backend(backend: str, device: torch.device) -> str:
    """Maps a requested backend and a device to the backend that will run, or raises a clear error."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("ESTA_BACKEND", "auto") or "auto"
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"ESTA_BACKEND={backend!r} is not one of auto, {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda":
            if triton_installed():
                return "triton"
            if _ext.has_cuda_kernels():
                return "cuda"
            return "torch"
        if device.type == "cpu" and _ext.has_cpu_kernels():
            return "cpu"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected auto or one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return backend
    if backend == "cpu":
        if not _ext.has_cpu_kernels():
            raise RuntimeError(f"backend 'cpu' needs the compiled extension esta_kernels._C: {_ext.BUILD_HINT}")
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs on CPU tensors, got tensors on {device}")
        return backend
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
        if not _ext.has_cuda_kernels():
            raise RuntimeError(
                "backend 'cuda' needs esta_kernels._C built with CUDA kernels (ESTA_BUILD_CUDA=1): "
                + _ext.BUILD_HINT
            )
        return backend
    # triton
    if not triton_installed():
        raise RuntimeError("backend 'triton' needs the triton package (pip install 'triton>=3.6')")
    if device.type == "cpu" and not triton_interpreter():
        raise ValueError(
            "backend 'triton' runs on CUDA tensors; CPU tensors need the Triton interpreter "
            "(set TRITON_INTERPRET=1 before importing triton)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend 'triton' does not support tensors on {device}")
    return backend
