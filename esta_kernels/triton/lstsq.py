"""Triton kernel of the least-squares accumulation (the `triton` backend of esta::lstsq_accumulate).

With u = h_in - shift_in[b], v = h_out - shift_out[b] for the rows of block b (row m is in block
m // SHIFT_BLOCK_ROWS; 1-D shifts apply to every row) and ua = [u, 1]:
    gram  = ua.T @ ua   (d_in + 1, d_in + 1) float64, symmetric
    cross = ua.T @ v    (d_in + 1, d_out)    float64

One launch. The column space is the concatenation c = [u | 1 | v] of width D = d_in + 1 + d_out, so gram and
cross are the two parts of one (d_in + 1, D) product ua.T @ c. A program owns an (I tile, J tile) of it and a
contiguous split of the rows; tiles strictly below the diagonal of the gram part are skipped (gram is
symmetric: the host mirrors the upper triangle). Each program reads its activation tiles once, builds ua and c
in registers (conversion to float32, the shift subtracted, the ones column made by tl.where) and runs
float32 IEEE dots (never TF32). Precision: the products of each block of at most 1024 rows are summed in
float32, and the block sums are added in float64 in the program; each program writes a float64 partial,
and the host sums the partials in a fixed order. No atomics, so the result is bitwise reproducible for a
given shape and device; partial memory is (splits, d_in + 1, D) float64 whatever the row count.

Like esta_kernels/triton/stitched_linear.py: the plan (arguments and grid) is computed from shapes only, so
tests/kernels/test_triton_compile.py compiles the very launches that run; CUDA tensors go through triton.autotune
(small config lists for Ampere and Hopper); under TRITON_INTERPRET=1 one small config runs, on CPU tensors
too. ESTA_TRITON_AUTOTUNE=0 runs the first config of each list without benchmarking.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, NamedTuple, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from esta_kernels._validate import SHIFT_BLOCK_ROWS
from esta_kernels.triton._common import autotune_enabled, device_info, interpreting

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_SHIFT_DTYPES = (torch.float32, torch.float64)
# Rows per float32 block sum (the contract's precision unit, = SHIFT_BLOCK_ROWS); the interpreter uses
# shorter blocks (dividing it) so that small tests cross block and split boundaries.
ROW_BLOCK = SHIFT_BLOCK_ROWS
_INTERPRETER_ROW_BLOCK = 256


# ------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _centred_tile(x_ptr, shift_ptr, rows64, row_mask, cols, col_mask, stride_m, stride_k,
                  ROWS_FIRST: tl.constexpr, F64: tl.constexpr):
    """The float32 tile x[rows, cols] - shift[cols] (zero where masked), laid out (rows, cols) when
    ROWS_FIRST, else (cols, rows). Float64 inputs subtract the shift in float64 before rounding."""
    cols64 = cols.to(tl.int64)
    if ROWS_FIRST:
        mask = row_mask[:, None] & col_mask[None, :]
        ptrs = x_ptr + rows64[:, None] * stride_m + cols64[None, :] * stride_k
    else:
        mask = row_mask[None, :] & col_mask[:, None]
        ptrs = x_ptr + rows64[None, :] * stride_m + cols64[:, None] * stride_k
    x = tl.load(ptrs, mask=mask, other=0.0)
    s = tl.load(shift_ptr + cols64, mask=col_mask, other=0.0)
    if ROWS_FIRST:
        s = s[None, :]
    else:
        s = s[:, None]
    if F64:
        u = (x.to(tl.float64) - s.to(tl.float64)).to(tl.float32)
    else:
        u = x.to(tl.float32) - s.to(tl.float32)
    # masked elements load 0 but the shift would make them -shift
    return tl.where(mask, u, 0.0)


@triton.jit
def _lstsq_accumulate_kernel(
    in_ptr, out_ptr, shift_in_ptr, shift_out_ptr, part_ptr,
    N, D_IN, D_OUT, ROWS_PER_SPLIT, N_BUCKET,
    stride_im, stride_ik,
    stride_om, stride_ok,
    stride_sib, stride_sob,
    stride_ps, stride_pi, stride_pj,
    IN_F64: tl.constexpr, OUT_F64: tl.constexpr, ROW_BLOCK: tl.constexpr, SHIFT_ROWS: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """part[split, i, j] = sum over the split's rows of ua[m, i] * c[m, j], c = [u | 1 | v], for the tile
    (i, j) of program axes 0 (J tiles fastest) and the split of axis 1. Rows of shift block m // SHIFT_ROWS
    subtract that row of the shifts (stride_sib / stride_sob: 0 for one shift); ROW_BLOCK divides SHIFT_ROWS,
    so a float32 block never straddles two shifts. N_BUCKET only keys the autotuner."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_j = tl.cdiv(D_IN + 1 + D_OUT, BLOCK_J)
    pid_i = pid // num_j
    pid_j = pid % num_j
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    D = D_IN + 1 + D_OUT

    # A tile strictly below the diagonal (every column index below every row index) is the mirror of one
    # above it: its program runs no row loop and stores nothing (no branch out of the kernel needed).
    lower = (pid_j + 1) * BLOCK_J <= pid_i * BLOCK_I
    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(N, m_start + ROWS_PER_SPLIT)
    m_end = tl.where(lower, m_start, m_end)

    # Column roles: ua = [u | 1] on the I side; on the J side u, the ones column, or v.
    i_is_u = offs_i < D_IN
    i_is_one = offs_i == D_IN
    j_is_u = offs_j < D_IN
    j_is_one = offs_j == D_IN
    j_is_v = (offs_j > D_IN) & (offs_j < D)
    j_v = tl.where(j_is_v, offs_j - D_IN - 1, 0)  # column of v (0 where unused: never dereferenced)

    offs_m = tl.arange(0, BLOCK_M)
    acc64 = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float64)
    for b0 in range(m_start, m_end, ROW_BLOCK):
        b_end = tl.minimum(m_end, b0 + ROW_BLOCK)
        # (blocks * stride is below rows * features: no int32 overflow)
        s_in_ptr = shift_in_ptr + (b0 // SHIFT_ROWS) * stride_sib
        s_out_ptr = shift_out_ptr + (b0 // SHIFT_ROWS) * stride_sob
        acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
        for m0 in range(b0, b_end, BLOCK_M):
            rows = m0 + offs_m
            row_mask = rows < b_end
            rows64 = rows.to(tl.int64)
            # ua transposed, (BLOCK_I, BLOCK_M): the left operand
            a = _centred_tile(in_ptr, s_in_ptr, rows64, row_mask, offs_i, i_is_u, stride_im, stride_ik,
                              False, IN_F64)
            a = tl.where(i_is_one[:, None] & row_mask[None, :], 1.0, a)
            # c, (BLOCK_M, BLOCK_J): a tile may straddle u, the ones column and v; masked loads skip the rest
            bu = _centred_tile(in_ptr, s_in_ptr, rows64, row_mask, offs_j, j_is_u, stride_im, stride_ik,
                               True, IN_F64)
            bv = _centred_tile(out_ptr, s_out_ptr, rows64, row_mask, j_v, j_is_v, stride_om, stride_ok,
                               True, OUT_F64)
            b = tl.where(j_is_one[None, :] & row_mask[:, None], 1.0, bu + bv)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        acc64 += acc.to(tl.float64)

    ptrs = (part_ptr + split.to(tl.int64) * stride_ps + offs_i.to(tl.int64)[:, None] * stride_pi
            + offs_j.to(tl.int64)[None, :] * stride_pj)
    mask = (i_is_u | i_is_one)[:, None] & (offs_j < D)[None, :] & (lower == 0)
    tl.store(ptrs, acc64, mask=mask)


# ------------------------------------------------------------------------------------ autotune configs
# Fields: BLOCK_I, BLOCK_J, BLOCK_M, num_warps, num_stages. IEEE float32 dots run as FMA loops (no tensor
# cores) that hold whole operand tiles in registers beside the float32 and float64 accumulators, so a
# 64 x 64 tile takes 8 warps (with 4 it spills) and the row step stays short. tests/kernels/test_triton_compile.py
# compiles each for sm_80 and sm_90 and checks that none spills.
_CONFIGS = {
    "hopper": [(64, 64, 16, 8, 3), (64, 64, 32, 8, 3), (32, 32, 16, 4, 3)],
    "ampere": [(64, 64, 16, 8, 2), (32, 128, 16, 8, 2), (32, 32, 16, 4, 2)],
}
# The host sizes the splits for this nominal tile (the autotuned tile changes the grid, not the buffers).
_NOMINAL_TILE = 64
_INTERPRETER_META = dict(BLOCK_I=16, BLOCK_J=32, BLOCK_M=32)


def autotune_configs(family: str) -> List[triton.Config]:
    """The triton.Config list of the accumulation kernel on an arch family ("ampere", "hopper")."""
    return [triton.Config(dict(BLOCK_I=bi, BLOCK_J=bj, BLOCK_M=bm), num_warps=w, num_stages=s)
            for bi, bj, bm, w, s in _CONFIGS[family]]


@functools.lru_cache(maxsize=None)
def _autotuner(family: str, enabled: bool):
    configs = autotune_configs(family)
    return triton.autotune(configs=configs if enabled else configs[:1],
                           key=["N_BUCKET", "D_IN", "D_OUT"])(_lstsq_accumulate_kernel)


# -------------------------------------------------------------------------------------------------- plan
class Launch(NamedTuple):
    """The launch, from shapes only: runtime `args` by name, the constexprs `meta` fixed by the host (the
    autotuner adds the block sizes), and `grid` mapping the full meta to a grid."""

    args: Dict[str, Any]
    meta: Dict[str, Any]
    grid: Callable[[Dict[str, Any]], Tuple[int, ...]]


def row_splits(n: int, d_in: int, d_out: int, interpreter: bool, num_sms: int) -> Tuple[int, int]:
    """(rows per split, number of splits): about two waves of programs of the nominal tile, each split a
    whole number of row blocks (in the interpreter: up to 3 splits of short blocks, to test them)."""
    if interpreter:
        block = _INTERPRETER_ROW_BLOCK
        want = min(3, triton.cdiv(n, block))
    else:
        block = ROW_BLOCK
        t_i = triton.cdiv(d_in + 1, _NOMINAL_TILE)
        t_j = triton.cdiv(d_in + 1 + d_out, _NOMINAL_TILE)
        tiles = t_i * t_j - t_i * (t_i - 1) // 2  # the tiles on or above the diagonal
        want = min(triton.cdiv(2 * num_sms, tiles), triton.cdiv(n, block))
    want = max(want, 1)
    rows = triton.cdiv(triton.cdiv(n, want), block) * block
    return rows, triton.cdiv(n, rows)


def plan_accumulate(h_in: Tensor, h_out: Tensor, shift_in: Tensor, shift_out: Tensor, *,
                    interpreter: bool = False, num_sms: int = 132) -> Tuple[Launch, Tensor]:
    """Plans the launch and allocates its float64 partial buffer (splits, d_in + 1, D) on h_in's device
    (n >= 1; the shifts contiguous). Returns (plan, partials); the gram part's entries below the diagonal
    are left unwritten."""
    n, d_in = h_in.shape
    d_out = h_out.shape[1]
    rows_per_split, splits = row_splits(n, d_in, d_out, interpreter, num_sms)
    part = torch.empty((splits, d_in + 1, d_in + 1 + d_out), dtype=torch.float64, device=h_in.device)
    meta = dict(IN_F64=h_in.dtype == torch.float64, OUT_F64=h_out.dtype == torch.float64,
                ROW_BLOCK=_INTERPRETER_ROW_BLOCK if interpreter else ROW_BLOCK, SHIFT_ROWS=SHIFT_BLOCK_ROWS)
    args = dict(
        in_ptr=h_in, out_ptr=h_out, shift_in_ptr=shift_in, shift_out_ptr=shift_out, part_ptr=part,
        N=n, D_IN=d_in, D_OUT=d_out, ROWS_PER_SPLIT=rows_per_split, N_BUCKET=triton.next_power_of_2(n),
        stride_im=h_in.stride(0), stride_ik=h_in.stride(1),
        stride_om=h_out.stride(0), stride_ok=h_out.stride(1),
        stride_sib=shift_in.stride(0) if shift_in.dim() == 2 else 0,
        stride_sob=shift_out.stride(0) if shift_out.dim() == 2 else 0,
        stride_ps=part.stride(0), stride_pi=part.stride(1), stride_pj=part.stride(2),
    )

    def grid(m):
        return (triton.cdiv(d_in + 1, m["BLOCK_I"]) * triton.cdiv(d_in + 1 + d_out, m["BLOCK_J"]), splits)

    return Launch(args, meta, grid), part


def _launch(plan: Launch, device: torch.device) -> None:
    if interpreting(_lstsq_accumulate_kernel, device, "lstsq_accumulate"):
        meta = {**_INTERPRETER_META, **plan.meta}
        _lstsq_accumulate_kernel[plan.grid(meta)](**plan.args, **meta)
        return
    family, _ = device_info(device.index)
    with torch.cuda.device(device):
        _autotuner(family, autotune_enabled())[plan.grid](**plan.args, **plan.meta)


# --------------------------------------------------------------------------------------------- checks
def _check(h_in: Tensor, h_out: Tensor, shift_in: Tensor, shift_out: Tensor) -> None:
    name = "lstsq_accumulate (triton)"
    for arg, t in (("h_in", h_in), ("h_out", h_out), ("shift_in", shift_in), ("shift_out", shift_out)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
    for arg, t in (("h_in", h_in), ("h_out", h_out)):
        if t.dim() != 2:
            raise ValueError(f"{name}: {arg} must be 2-D (n, features), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: {arg} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.shape[1] == 0:
            raise ValueError(f"{name}: {arg} has no features (shape {tuple(t.shape)})")
    if h_in.shape[0] != h_out.shape[0]:
        raise ValueError(f"{name}: h_in and h_out must have the same number of rows, got {h_in.shape[0]} "
                         f"and {h_out.shape[0]}")
    blocks = triton.cdiv(h_in.shape[0], SHIFT_BLOCK_ROWS)
    for arg, t, h in (("shift_in", shift_in, h_in), ("shift_out", shift_out, h_out)):
        if t.shape != (h.shape[1],) and t.shape != (blocks, h.shape[1]):
            raise ValueError(f"{name}: {arg} must have shape ({h.shape[1]},) or ({blocks}, {h.shape[1]}) (one row "
                             f"per block of {SHIFT_BLOCK_ROWS} rows), got {tuple(t.shape)}")
        if t.dtype not in _SHIFT_DTYPES:
            raise TypeError(f"{name}: {arg} must be float32 (or float64), got {t.dtype}")
    dev = h_in.device
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"{name}: tensors must be on CUDA (or the CPU under TRITON_INTERPRET=1), got {dev}")
    for arg, t in (("h_out", h_out), ("shift_in", shift_in), ("shift_out", shift_out)):
        if t.device != dev:
            raise ValueError(f"{name}: all tensors must be on one device: h_in is on {dev}, {arg} on {t.device}")


# ---------------------------------------------------------------------------------------- entry point
def triton_lstsq_accumulate(h_in: Tensor, h_out: Tensor, shift_in: Tensor, shift_out: Tensor
                            ) -> Tuple[Tensor, Tensor]:
    """(gram (d_in + 1, d_in + 1), cross (d_in + 1, d_out)), both float64, of one batch; see the module
    docstring. h_in (n, d_in) and h_out (n, d_out) may have any float dtype and any strides."""
    _check(h_in, h_out, shift_in, shift_out)
    n, d_in = h_in.shape
    d_out = h_out.shape[1]
    dev = h_in.device
    if n == 0:
        return (torch.zeros((d_in + 1, d_in + 1), dtype=torch.float64, device=dev),
                torch.zeros((d_in + 1, d_out), dtype=torch.float64, device=dev))
    interp = interpreting(_lstsq_accumulate_kernel, dev, "lstsq_accumulate")
    # the kernel reads the shifts with unit stride (they are small)
    shift_in, shift_out = shift_in.contiguous(), shift_out.contiguous()
    num_sms = device_info(dev.index)[1] if dev.type == "cuda" and not interp else 132
    plan, part = plan_accumulate(h_in, h_out, shift_in, shift_out, interpreter=interp, num_sms=num_sms)
    _launch(plan, dev)
    # torch adds the float64 partials in a fixed order (no atomics): deterministic
    total = part[0] if part.shape[0] == 1 else part.sum(0)
    upper = total[:, : d_in + 1].triu()  # the unwritten entries below the diagonal are dropped here
    gram = upper + upper.triu(1).T
    cross = total[:, d_in + 1:].contiguous()
    return gram, cross
