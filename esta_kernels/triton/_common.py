"""Helpers shared by the Triton launchers: interpreter detection, device facts, autotune switch."""
from __future__ import annotations

import functools
import os
from typing import Tuple

import torch


def arch_family(capability_major: int) -> str:
    return "hopper" if capability_major >= 9 else "ampere"


def autotune_enabled() -> bool:
    # ESTA_TRITON_AUTOTUNE=0: the first config of each list, no benchmarking (quick tests, first calls)
    return os.environ.get("ESTA_TRITON_AUTOTUNE", "1") != "0"


def interpreting(kernel, device: torch.device, op: str) -> bool:
    """True when `kernel` runs in Triton's interpreter: TRITON_INTERPRET=1 was set when triton was imported
    (triton.jit then returns interpreter functions, for CPU and CUDA tensors alike). CPU tensors without
    the interpreter are an error naming `op`."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(kernel, InterpretedFunction)
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"{op} (triton): CPU tensors run only in Triton's interpreter; set TRITON_INTERPRET=1 "
            "before triton is first imported"
        )
    return interpreted


@functools.lru_cache(maxsize=None)
def device_info(index: int) -> Tuple[str, int]:
    """(arch family, multiprocessor count) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return arch_family(props.major), props.multi_processor_count


@functools.lru_cache(maxsize=None)
def device_capability(index: int) -> Tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    return torch.cuda.get_device_capability(index)
