"""Argument checks of the esta operators, shared by every backend: the stitched linear's, then the
least-squares accumulation's.

Shape errors raise ValueError, dtype errors TypeError, device mismatches ValueError, and stitch ids
outside [-1, S) IndexError; every message names the argument.
"""
from __future__ import annotations

import math
import numbers
import operator

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


# ----------------------------------------------------------------------------------- stitch-id ranges
# Ids outside [-1, S) are an error. How it is reported depends on where the ids live:
#   - on the host (an int, a CPU tensor): checked eagerly here, IndexError before anything is written;
#   - on a GPU: reading them would be a device-to-host sync per call. The kernels treat such an id as "no
#     stitch bias" (never an out-of-bounds read) and clear a one-element int32 flag (1 = all ids good);
#     report_bad_ids() then queues torch._assert_async on it, which fails the stream later, like torch's
#     own device-side index checks, without a sync, and is capturable in a CUDA graph (the custom ops are
#     opaque to torch.compile, so it runs the same there). Two small launches per call: the fill and the
#     assert. A kernel that cannot write a flag uses assert_ids_in_range_async() (an on-device range test,
#     no sync) instead.
# The CUDA backend shares these helpers: new_bad_id_flag() before its launches, its kernels write 0 for
# a bad id, report_bad_ids() after.
BAD_ID_MESSAGE = "stitched_linear: a stitch id is outside [-1, {S}) (S = {S} stitch-bias rows)"


def ids_checked_on_host(ids: torch.Tensor) -> bool:
    """True when the ids can be read without a device sync (they live in host memory)."""
    return ids.device.type == "cpu"


def check_ids_range(ids: torch.Tensor, num_stitches: int) -> None:
    """Raises IndexError for any id outside [-1, S). Reads the ids: call it for host ids only (on a GPU it
    would be a device sync; use the flag below there)."""
    if ids is None or ids.numel() == 0 or ids.device.type == "meta":  # meta tensors hold no values
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= num_stitches:
        bad = lo if lo < -1 else hi
        raise IndexError(
            f"stitched_linear: stitch id {bad} is outside [-1, {num_stitches}) "
            f"(S = {num_stitches} stitch-bias rows)"
        )


def new_bad_id_flag(device: torch.device) -> torch.Tensor:
    """A one-element int32 flag holding 1 ("every id good"); kernels write 0 when they meet an id outside
    [-1, S)."""
    return torch.ones(1, dtype=torch.int32, device=device)


def report_bad_ids(flag: torch.Tensor, num_stitches: int) -> None:
    """Fails (asynchronously on a GPU, at once on the CPU) when a kernel cleared the flag; never syncs."""
    torch._assert_async(flag, BAD_ID_MESSAGE.format(S=num_stitches))


def assert_ids_in_range_async(ids: torch.Tensor, num_stitches: int) -> None:
    """The same report for a path whose kernels write no flag: an on-device range test, no sync."""
    if ids.numel():
        torch._assert_async(((ids >= -1) & (ids < num_stitches)).all(), BAD_ID_MESSAGE.format(S=num_stitches))


def flat_ids(stitch_ids: torch.Tensor) -> torch.Tensor:
    """The 1-D int64 ids the ops take (a view when the ids already are contiguous int64; uint64 ids above
    2^63 - 1 saturate, see as_int64_ids)."""
    return as_int64_ids(stitch_ids.reshape(-1))


# ------------------------------------------------------------------------------- esta::lstsq_accumulate
# Rows per shift block of the least-squares accumulation, on every backend: row m of a batch is centred by
# row m // SHIFT_BLOCK_ROWS of a 2-D shift (the float32 block sums never straddle two).
SHIFT_BLOCK_ROWS = 1024
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def check_accumulate_args(h_in, h_out, shift_in, shift_out, backend: str) -> None:
    """The op's contract, checked before dispatch so every backend raises the same clear errors:
    ValueError for shapes and devices, TypeError for dtypes, each naming the argument."""
    op = "lstsq_accumulate"
    for name, t in (("h_in", h_in), ("h_out", h_out), ("shift_in", shift_in), ("shift_out", shift_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("h_in", h_in), ("h_out", h_out)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    shift_dtypes = (torch.float32,) if backend in ("triton", "cuda") else (torch.float32, torch.float64)
    for name, t in (("shift_in", shift_in), ("shift_out", shift_out)):
        if t.dtype not in shift_dtypes:
            allowed = " or ".join(_DTYPE_NAMES[d] for d in shift_dtypes)
            raise TypeError(f"{op}: {name} must be {allowed} on the {backend} backend, got {t.dtype}")
    if backend in ("triton", "cuda"):
        for name, t in (("h_in", h_in), ("h_out", h_out)):
            if t.dtype == torch.float64:
                raise TypeError(f"{op}: the {backend} backend does not take float64 {name}; use 'cpu' or 'torch'")
    if h_in.dim() != 2:
        raise ValueError(f"{op}: h_in must be 2-D (n, d_in), got shape {tuple(h_in.shape)}")
    if h_out.dim() != 2:
        raise ValueError(f"{op}: h_out must be 2-D (n, d_out), got shape {tuple(h_out.shape)}")
    if h_in.shape[0] != h_out.shape[0]:
        raise ValueError(
            f"{op}: h_in and h_out must have the same number of rows, got {h_in.shape[0]} and {h_out.shape[0]}"
        )
    if h_in.shape[1] < 1:
        raise ValueError(f"{op}: h_in must have at least one feature (d_in >= 1), got shape {tuple(h_in.shape)}")
    if h_out.shape[1] < 1:
        raise ValueError(f"{op}: h_out must have at least one feature (d_out >= 1), got shape {tuple(h_out.shape)}")
    blocks = -(-h_in.shape[0] // SHIFT_BLOCK_ROWS)
    for name, t, h, x in (("shift_in", shift_in, h_in, "h_in"), ("shift_out", shift_out, h_out, "h_out")):
        d = h.shape[1]
        if t.shape != (d,) and t.shape != (blocks, d):
            raise ValueError(
                f"{op}: {name} must have shape ({d},) or ({blocks}, {d}) (one row per block of "
                f"{SHIFT_BLOCK_ROWS} rows of {x}), got {tuple(t.shape)}"
            )
    dev = h_in.device
    for name, t in (("h_out", h_out), ("shift_in", shift_in), ("shift_out", shift_out)):
        if t.device != dev:
            raise ValueError(f"{op}: all tensors must be on one device: h_in is on {dev}, {name} on {t.device}")
