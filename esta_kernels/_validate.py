"""Argument checks shared by every backend of the stitched linear.

Shape errors raise ValueError, dtype errors TypeError, device mismatches ValueError, and stitch ids
outside [-1, S) IndexError; every message names the argument.
"""
from __future__ import annotations

import math
import numbers
import operator
import weakref

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_tensor(name: str, t, allow_none: bool = True) -> None:
    if t is None:
        if not allow_none:
            raise TypeError(f"stitched_linear: {name} must be a tensor, got None")
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"stitched_linear: {name} must be a torch.Tensor or None, got {type(t).__name__}")


def host_stitch_id(value) -> int:
    """An int stitch id given on the host: a Python int or anything with __index__ (numpy integers),
    never a bool."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"stitched_linear: stitch_ids must be an int or an integer tensor, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"stitched_linear: stitch_ids must be an int or an integer tensor, got {type(value).__name__}"
        ) from None


def check_scale(scale) -> float:
    """The LoRA scale: a finite real number (int, float, numpy float; not a bool or a string)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"stitched_linear: scale must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"stitched_linear: scale must be finite, got {scale}")
    return scale


def as_int64_ids(ids: torch.Tensor) -> torch.Tensor:
    """The ids as int64, without wrapping: uint64 values above 2^63 - 1 (which a cast would turn negative,
    e.g. 2^64 - 1 into -1, "no stitch bias") become 2^63 - 1, out of range for every table. No data is read
    on the host."""
    if ids.dtype == torch.int64:
        return ids
    if ids.dtype == torch.uint64:
        signed = ids.view(torch.int64)
        return torch.where(signed < 0, torch.iinfo(torch.int64).max, signed)
    return ids.to(torch.int64)


def check_stitched_linear_args(x, weight, bias, lora_a, lora_b, stitch_bias, stitch_ids) -> None:
    """Checks everything that can be checked without reading tensor data (so it traces under compile)."""
    _check_tensor("x", x, allow_none=False)
    _check_tensor("weight", weight, allow_none=False)
    for name, t in (("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b), ("stitch_bias", stitch_bias)):
        _check_tensor(name, t)

    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"stitched_linear: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(
            f"stitched_linear: x and weight must share one dtype (as in F.linear), got x {x.dtype} "
            f"and weight {weight.dtype}"
        )
    if x.dim() < 1:
        raise ValueError("stitched_linear: x must have at least one dimension (..., K)")
    if weight.dim() != 2:
        raise ValueError(f"stitched_linear: weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(
            f"stitched_linear: x's last dimension ({x.shape[-1]}) must equal weight's in_features K ({K})"
        )

    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"stitched_linear: bias must have shape ({N},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"stitched_linear: bias must have x's dtype {x.dtype}, got {bias.dtype}")

    if (lora_a is None) != (lora_b is None):
        raise ValueError("stitched_linear: lora_a and lora_b must be given together (or both None)")
    if lora_a is not None:
        if lora_a.dim() != 2 or lora_b.dim() != 2:
            raise ValueError(
                f"stitched_linear: lora_a must be (r, K) and lora_b (N, r), got {tuple(lora_a.shape)} "
                f"and {tuple(lora_b.shape)}"
            )
        r = lora_a.shape[0]
        if r < 1:
            raise ValueError("stitched_linear: the LoRA rank r must be at least 1")
        if lora_a.shape[1] != K:
            raise ValueError(
                f"stitched_linear: lora_a must have shape (r, K) = ({r}, {K}), got {tuple(lora_a.shape)}"
            )
        if lora_b.shape != (N, r):
            raise ValueError(
                f"stitched_linear: lora_b must have shape (N, r) = ({N}, {r}) to match lora_a's rank, "
                f"got {tuple(lora_b.shape)}"
            )
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if t.dtype not in (x.dtype, torch.float32):
                raise TypeError(f"stitched_linear: {name} must be {x.dtype} or float32, got {t.dtype}")

    if stitch_bias is not None:
        if stitch_bias.dim() != 2 or stitch_bias.shape[1] != N:
            raise ValueError(
                f"stitched_linear: stitch_bias must have shape (S, N) with N = {N}, got {tuple(stitch_bias.shape)}"
            )
        if stitch_bias.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"stitched_linear: stitch_bias must be {x.dtype} or float32, got {stitch_bias.dtype}")

    if stitch_ids is not None:
        if stitch_bias is None:
            raise ValueError("stitched_linear: stitch_ids were given but stitch_bias is None")
        if isinstance(stitch_ids, torch.Tensor):
            if stitch_ids.dtype.is_floating_point or stitch_ids.dtype.is_complex or stitch_ids.dtype == torch.bool:
                raise TypeError(f"stitched_linear: stitch_ids must be an integer tensor, got {stitch_ids.dtype}")
            if stitch_ids.dim() != 0 and stitch_ids.shape != x.shape[:-1]:
                raise ValueError(
                    f"stitched_linear: stitch_ids must be an int, a 0-d tensor, or have x's leading shape "
                    f"{tuple(x.shape[:-1])}, got {tuple(stitch_ids.shape)}"
                )
        else:
            stitch_id = host_stitch_id(stitch_ids)
            S = stitch_bias.shape[0]
            if not -1 <= stitch_id < S:
                raise IndexError(f"stitched_linear: stitch id {stitch_id} is outside [-1, {S}) (S = {S} stitch-bias rows)")

    dev = x.device
    for name, t in (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b),
                    ("stitch_bias", stitch_bias), ("stitch_ids", stitch_ids)):
        if isinstance(t, torch.Tensor) and t.device != dev:
            raise ValueError(f"stitched_linear: all tensors must be on one device: x is on {dev}, {name} on {t.device}")


# Ranges of id tensors already read, so that one ids tensor shared by every layer of a step (and saved
# for their backward) costs one device read, not one per call. Keyed by id(tensor); an entry counts only
# while the weak reference still points to that very tensor and its version counter (bumped by every
# in-place write, shared with its views) is unchanged.
_ID_RANGES: dict = {}
_ID_RANGES_MAX = 512


def _lookup_range(ids: torch.Tensor):
    hit = _ID_RANGES.get(id(ids))
    if hit is not None and hit[0]() is ids and hit[1] == ids._version:
        return hit[2], hit[3]
    return None


def remember_ids_range(ids: torch.Tensor, lo: int, hi: int) -> None:
    """Records that every id in `ids` lies in [lo, hi] (known on the host, e.g. an int the caller checked)."""
    if torch.compiler.is_compiling():
        return
    if len(_ID_RANGES) >= _ID_RANGES_MAX:
        for key in [k for k, v in _ID_RANGES.items() if v[0]() is None]:
            del _ID_RANGES[key]
        if len(_ID_RANGES) >= _ID_RANGES_MAX:
            _ID_RANGES.clear()
    _ID_RANGES[id(ids)] = (weakref.ref(ids), ids._version, lo, hi)


def check_ids_range(ids: torch.Tensor, num_stitches: int) -> None:
    """Raises IndexError for any id outside [-1, S). Reading the ids is a device sync on a GPU; it happens
    once per ids tensor (until it is written in place), however many layers and backward passes use it."""
    if ids is None or ids.numel() == 0 or ids.device.type == "meta":  # meta tensors hold no values
        return
    known = _lookup_range(ids)
    if known is None:
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        remember_ids_range(ids, lo, hi)
    else:
        lo, hi = known
    if lo < -1 or hi >= num_stitches:
        bad = lo if lo < -1 else hi
        raise IndexError(
            f"stitched_linear: stitch id {bad} is outside [-1, {num_stitches}) "
            f"(S = {num_stitches} stitch-bias rows)"
        )


def flat_ids(stitch_ids: torch.Tensor) -> torch.Tensor:
    """The 1-D int64 ids the ops take. Outside torch.compile the view is memoized per ids tensor, so every
    layer that gets the same ids tensor hands the ops the same object and its range is read once."""
    if torch.compiler.is_compiling():
        return as_int64_ids(stitch_ids.reshape(-1))
    hit = _FLAT.get(id(stitch_ids))
    if hit is not None and hit[0]() is stitch_ids and hit[1] == stitch_ids._version:
        flat = hit[2]()  # held weakly: the memo never keeps ids memory alive
        if flat is not None:
            return flat
    flat = as_int64_ids(stitch_ids.reshape(-1))
    known = _lookup_range(stitch_ids)
    if known is not None:
        remember_ids_range(flat, *known)
    if len(_FLAT) >= _ID_RANGES_MAX:
        for key in [k for k, v in _FLAT.items() if v[0]() is None or v[2]() is None]:
            del _FLAT[key]
        if len(_FLAT) >= _ID_RANGES_MAX:
            _FLAT.clear()
    _FLAT[id(stitch_ids)] = (weakref.ref(stitch_ids), stitch_ids._version, weakref.ref(flat))
    return flat


_FLAT: dict = {}
