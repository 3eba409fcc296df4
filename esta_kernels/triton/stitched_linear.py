"""Triton kernels of the fused stitched linear (the `triton` backend).

    y = x @ W.T + bias + scale * (x @ A.T) @ B.T + stitch_bias[ids]        (A = lora_a, B = lora_b)

Layers, as in Liger-Kernel: private @triton.jit kernels, plans (argument sets and grids, computed from
tensor shapes only, so the compile test and `python -m esta_kernels.inspect` build the very launches that
run), host launchers that pick block sizes, and the entry points called by the custom ops in
esta_kernels/_ops.py.

Two GEMM paths, chosen per call by `tma_path` (the one dispatch rule):
  - Hopper (sm_90, 16-bit x and weight, TMA-legal strides): `_persistent_gemm_kernel`
    (esta_kernels/triton/hopper_gemm.py), persistent programs fed by tensor descriptors;
  - everything else (float32, strides TMA cannot take such as K = 37, sm_80): the pointer kernel
    `_stitched_gemm_kernel` below, one program per output tile.
Forward, two launches: xa = x @ A.T, (M, r) float32 (a thin GEMM), then y = x @ W.T + scale * xa @ B.T
+ bias + stitch_bias[ids[m]] (the LoRA term one more MMA on the same accumulator, bias and the per-row
stitch-bias gather in the epilogue). ESTA_TRITON_XA=fused computes xa inside the main loop instead (Hopper
path, rank <= 32; see bench/README.md for the two variants).
Backward: g = scale * dy @ B and dx = dy @ W + g @ A (on the Hopper path one launch: its g jobs write g
before the dx tiles that need it, so dy is read once for both; ESTA_TRITON_G=thin, and the pointer path,
run a thin GEMM for g first);
d B = scale * dy.T @ xa and d stitch_bias = onehot(ids).T @ dy in one split-M pass over dy
(`_row_reduce_kernel`: two tensor-core dots from each dy tile); d A = (x.T @ g).T in one split-M pass over
x. The reductions over M write per-split partials that torch sums in a fixed order: deterministic, no
float atomics.

Precision: every float accumulates in float32. With 16-bit activations every tl.dot takes 16-bit operands
(float32 factors and intermediates are rounded to the activation dtype first, as autocast would): no TF32
path at any rank. Float32 activations use IEEE float32 dots, or TF32 where torch allows it for float32
matmuls. On NVIDIA GPUs each tl.dot dimension must be >= 16, so the rank and the stitch count are padded
to powers of two >= 16 and masked (the interpreter would accept less).

Stitch ids outside [-1, S) add nothing and are never dereferenced; the kernels also clear a one-element
flag for them, which esta_kernels._validate.report_bad_ids turns into an asynchronous assert (no
device-to-host sync per call); ids in host memory are checked on the host first (IndexError).

CUDA tensors run the JIT kernels through triton.autotune. Under TRITON_INTERPRET=1 (set before triton is
imported) the same kernels run in Triton's interpreter, on CPU tensors too, with one small config; the
Hopper path runs there with ESTA_TRITON_ARCH=90 (the tests do), and ESTA_TRITON_ARCH=80 sends a Hopper GPU
down the pointer path. ESTA_TRITON_AUTOTUNE=0 skips autotuning (the first config of each list runs).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from esta_kernels._validate import check_ids_range, ids_checked_on_host, new_bad_id_flag, report_bad_ids
from esta_kernels.triton import hopper_gemm
from esta_kernels.triton._common import autotune_enabled, device_capability, device_info, interpreting

_ACC = torch.float32
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOWP = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _stitched_gemm_kernel(
    a_ptr, w_ptr, out_ptr, bias_ptr, xa_ptr, up_ptr, sb_ptr, ids_ptr, flag_ptr,
    M, N, K, R, S, M_BUCKET,
    stride_am, stride_ak,
    stride_wk, stride_wn,
    stride_om, stride_on,
    stride_bias,
    stride_xam, stride_xar,
    stride_ur, stride_un,
    stride_sbs, stride_sbn,
    stride_ids,
    main_scale, lora_scale,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_STITCH: tl.constexpr,
    LOWP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out (M, N) = main_scale * a (M, K) @ w (K, N) [+ lora_scale * xa (M, R) @ up (R, N)] [+ bias]
    [+ sb[ids[m]]]. LOWP: a is 16-bit and every dot takes operands in a's dtype; else float32 dots at
    PRECISION. M_BUCKET only keys the autotuner."""
    dt = a_ptr.dtype.element_ty
    # Grouped program order: GROUP_M row blocks share each column block of w while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows and columns past the edge wrap onto valid ones, so loads need no row/column mask (the store
    # masks them); int64 so that row * stride cannot overflow on large activations.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        if LOWP:
            acc = tl.dot(a, w.to(dt), acc)
        else:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    acc = acc * main_scale

    if HAS_LORA:
        # The float32 LoRA intermediate continues the reduction: [a | xa] @ [w; up].
        offs_r = tl.arange(0, BLOCK_R)
        xa_ptrs = xa_ptr + rows[:, None] * stride_xam + offs_r[None, :] * stride_xar
        up_ptrs = up_ptr + offs_r[:, None] * stride_ur + cols[None, :] * stride_un
        for r0 in range(0, R, BLOCK_R):
            r_mask = offs_r < R - r0
            xa = tl.load(xa_ptrs, mask=r_mask[None, :], other=0.0) * lora_scale
            up = tl.load(up_ptrs, mask=r_mask[:, None], other=0.0)
            if LOWP:
                acc = tl.dot(xa.to(dt), up.to(dt), acc)
            else:
                acc = tl.dot(xa, up.to(tl.float32), acc, input_precision=PRECISION)
            xa_ptrs += BLOCK_R * stride_xar
            up_ptrs += BLOCK_R * stride_ur

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias)
        acc += bias.to(tl.float32)[None, :]

    if HAS_STITCH:
        # stride_ids is 0 when one id serves every row. Ids outside [0, S) add nothing and are never
        # dereferenced; those outside [-1, S) also clear the flag (the first column block reports them).
        ids = tl.load(ids_ptr + rows * stride_ids)
        valid = (ids >= 0) & (ids < S)
        bad = (offs_m < M) & ((ids < -1) | (ids >= S)) & (pid_n == 0)
        tl.store(flag_ptr + offs_m * 0, tl.zeros((BLOCK_M,), tl.int32), mask=bad)
        safe_ids = tl.where(valid, ids, 0)
        sb_ptrs = sb_ptr + safe_ids[:, None] * stride_sbs + cols[None, :] * stride_sbn
        sb = tl.load(sb_ptrs, mask=valid[:, None], other=0.0)
        acc += sb.to(tl.float32)

    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# P, Q, S are often 1 (rank 1, one stitch): not specialized on, so those run the code larger sizes run.
@triton.jit(do_not_specialize=["P", "Q", "S"])
def _row_reduce_kernel(
    l_ptr, r_ptr, ids_ptr, out_ptr, sout_ptr, flag_ptr,
    M, P, Q, S, ROWS_PER_SPLIT, M_BUCKET,
    stride_lm, stride_lp,
    stride_rm, stride_rq,
    stride_ids,
    stride_o_split, stride_op, stride_oq,
    stride_so_split, stride_sos, stride_sop,
    scale,
    HAS_R: tl.constexpr, HAS_STITCH: tl.constexpr,
    LOWP: tl.constexpr, PRECISION: tl.constexpr, STITCH_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Reductions over the rows m of one split of M (program axis 2), written as float32 partials:
        out[split, p, q]  = scale * sum_m l[m, p] * r[m, q]            (HAS_R)
        sout[split, s, p] = sum_m [ids[m] == s] * l[m, p]               (HAS_STITCH; a one-hot matmul)
    LOWP 1: r is cast to l's (16-bit) dtype, 2: l to r's; 0: float32 dots at PRECISION (no 16-bit operand).
    Program axis 1 indexes a Q tile of `out` and an S tile of `sout` at once, so with one tile of each
    (the usual case) l is read once for both."""
    pid_p = tl.program_id(0)
    job = tl.program_id(1)
    split = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    offs_q = job * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < Q
    offs_s = job * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = offs_s < S

    m_start = split * ROWS_PER_SPLIT
    m_end = tl.minimum(M, m_start + ROWS_PER_SPLIT)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_P, BLOCK_S), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + offs_m
        m_mask = rows < m_end
        rows64 = rows.to(tl.int64)
        # l loaded transposed, (BLOCK_P, BLOCK_M): it is the left operand of both dots
        lt = tl.load(l_ptr + rows64[None, :] * stride_lm + offs_p.to(tl.int64)[:, None] * stride_lp,
                     mask=m_mask[None, :] & p_mask[:, None], other=0.0)
        # No branches in the loop (its loads stay pipelined): a program whose job index is past the Q (or
        # S) tiles loads nothing for that part (all masked) and adds zeros.
        if HAS_R:
            rt = tl.load(r_ptr + rows64[:, None] * stride_rm + offs_q.to(tl.int64)[None, :] * stride_rq,
                         mask=m_mask[:, None] & q_mask[None, :], other=0.0)
            if LOWP == 1:
                acc = tl.dot(lt, rt.to(l_ptr.dtype.element_ty), acc)
            elif LOWP == 2:
                acc = tl.dot(lt.to(r_ptr.dtype.element_ty), rt, acc)
            else:
                acc = tl.dot(lt.to(tl.float32), rt.to(tl.float32), acc, input_precision=PRECISION)
        if HAS_STITCH:
            ids = tl.load(ids_ptr + rows64 * stride_ids, mask=m_mask & (job * BLOCK_S < S), other=-1)
            bad = m_mask & ((ids < -1) | (ids >= S)) & (pid_p == 0) & (job == 0)
            tl.store(flag_ptr + rows * 0, tl.zeros((BLOCK_M,), tl.int32), mask=bad)
            # An id matches at most its own column; ids outside [0, S) match no stored column.
            onehot = ids[:, None] == offs_s[None, :]
            if STITCH_FP32:
                # a sum, not a matmul: keep float32 exact rather than TF32
                acc_s = tl.dot(lt.to(tl.float32), onehot.to(tl.float32), acc_s, input_precision="ieee")
            else:
                acc_s = tl.dot(lt, onehot.to(lt.dtype), acc_s)

    if HAS_R:
        out_ptrs = (out_ptr + split * stride_o_split + offs_p.to(tl.int64)[:, None] * stride_op
                    + offs_q.to(tl.int64)[None, :] * stride_oq)
        tl.store(out_ptrs, acc * scale, mask=p_mask[:, None] & q_mask[None, :])
    if HAS_STITCH:
        sout_ptrs = (sout_ptr + split * stride_so_split + offs_s.to(tl.int64)[None, :] * stride_sos
                     + offs_p.to(tl.int64)[:, None] * stride_sop)
        tl.store(sout_ptrs, acc_s, mask=p_mask[:, None] & s_mask[None, :])


# ------------------------------------------------------------------------------------ autotune configs
# Pointer kernel (the fallback). Tuple fields: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages.
# Shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K * element size; every config fits the 163 KB of
# an A100 (sm_80) and the 227 KB of an H100 (sm_90), and no 16-bit one spills registers
# (tests/kernels/test_triton_compile.py checks both). 16-bit configs use BLOCK_K = 64 on Hopper and 32 on Ampere
# (mma.sync, more stages); float32 halves the tile area. Configs a smaller card cannot hold (sm_86 has
# 99 KB) fail to launch there and the autotuner skips them.
_GEMM_CONFIGS = {
    ("hopper", "16bit"): [
        (128, 256, 64, 8, 8, 3),
        (128, 128, 64, 8, 8, 4),
        (64, 128, 64, 8, 4, 4),
        (128, 64, 64, 8, 4, 4),
    ],
    ("hopper", "fp32"): [
        (128, 128, 32, 8, 8, 3),
        (128, 64, 32, 8, 4, 4),
        (64, 128, 32, 8, 4, 4),
        (64, 64, 32, 8, 4, 4),
    ],
    ("ampere", "16bit"): [
        (128, 256, 32, 8, 8, 3),
        (256, 128, 32, 8, 8, 3),
        (128, 128, 32, 8, 8, 4),
        (128, 128, 32, 8, 4, 4),
        (64, 128, 32, 8, 4, 4),
        (128, 64, 32, 8, 4, 4),
    ],
    ("ampere", "fp32"): [
        (128, 128, 32, 8, 8, 3),
        (128, 64, 32, 8, 4, 3),
        (64, 128, 32, 8, 4, 3),
        (64, 64, 32, 8, 4, 4),
    ],
}
# With 16-bit activations the pointer kernel's stitch-bias gather loads a (BLOCK_M, BLOCK_N) tile in the
# epilogue beside the accumulator: those launches keep to at most 64 accumulator registers per thread
# (bigger tiles spill).
_HEAVY_EPILOGUE_ACC_REGS = 64
# Thin GEMMs (xa = x @ A.T, g = scale * dy @ B): BLOCK_N is the padded rank, set by the launcher; the
# autotuner picks the row block (more programs for small M) and the K depth. Fields: BLOCK_M, BLOCK_K,
# num_warps, num_stages.
_THIN_CONFIGS = {
    "16bit": [(32, 128, 4, 4), (64, 128, 4, 4), (128, 64, 4, 3)],
    "fp32": [(32, 64, 4, 4), (64, 64, 4, 4), (128, 32, 4, 3)],
}
# Row reductions (d lora_b + d stitch_bias, d lora_a), memory-bound; fields BLOCK_M, num_warps,
# num_stages. Float32 dots at full precision ("fma": CUDA cores, no tensor cores) hold whole operand
# tiles in registers, so they take short row blocks; "wide" is a right operand wider than 64 (a rank up
# to 256 in one tile, so the left operand is read once), with a float32 right operand in shared memory.
_REDUCE_CONFIGS = {
    "mma": [(64, 4, 3), (128, 8, 3)],
    "wide": [(64, 8, 2), (32, 8, 3)],
    ("wide", "ampere"): [(32, 8, 3)],  # 64-row blocks spill on sm_80 (mma.sync holds more in registers)
    "fma": [(16, 4, 3), (32, 8, 3)],
}
_REDUCE_MAX_BLOCK_M = 128  # splits of M are multiples of every BLOCK_M above
_REDUCE_MAX_BLOCK_Q = 256

# Under TRITON_INTERPRET=1 one small config (the interpreter runs each program in numpy). Dot dimensions
# stay >= 16 as on the GPU; the persistent kernel runs on 3 "SMs", so programs take several tiles.
_INTERPRETER_META = {
    "gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
    "thin": dict(BLOCK_M=32, BLOCK_K=32, GROUP_M=1),
    "reduce": dict(BLOCK_M=32),
    "tma": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, WARP_SPECIALIZE=False, FLATTEN=False),
    "tma_thin": dict(BLOCK_M=32, BLOCK_K=32, GROUP_M=1, WARP_SPECIALIZE=False, FLATTEN=False),
}
_INTERPRETER_MAX_BLOCK_R = 16  # small, so that tests with r > 16 cover the rank loop
_INTERPRETER_MAX_BLOCK_S = 16
_INTERPRETER_NUM_SMS = 3
# Widest g chunk of a G_JOBS launch (at most the narrowest BLOCK_N of the main configs: a g job's
# accumulator is never wider than a dx tile's)
G_MAX_BLOCK = 128
# Most polls of a dx tile waiting for its row block's g (an L2 round trip each, ~1 us): a g job takes at
# most one main loop (tens of us at the LLaMA shapes), so the bound is reached only when the program
# running that g job is not resident; the tile then computes its g itself.
G_MAX_POLLS = 1 << 14


def autotune_configs(role: str, family: str, tune: str) -> List[triton.Config]:
    """The triton.Config list of a launch role ("gemm", "thin", "reduce" on the pointer path; "tma",
    "tma_thin" on the Hopper path) on an arch family ("ampere", "hopper") for a tuning class
    (Launch.tune)."""
    if role == "tma":
        return hopper_gemm.main_configs(heavy=tune.endswith("+heavy"), fused=tune.startswith("fused"),
                                        g_jobs=tune == "gjobs")
    if role == "tma_thin":
        return hopper_gemm.thin_configs(tune)
    if role == "gemm":
        dtype_class, _, heavy = tune.partition("+")
        rows = _GEMM_CONFIGS[(family, dtype_class)]
        if heavy:
            rows = [c for c in rows if c[0] * c[1] <= _HEAVY_EPILOGUE_ACC_REGS * 32 * c[4]]
        return [
            triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm), num_warps=w, num_stages=s)
            for bm, bn, bk, gm, w, s in rows
        ]
    if role == "thin":
        return [
            triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk, GROUP_M=1), num_warps=w, num_stages=s)
            for bm, bk, w, s in _THIN_CONFIGS[tune]
        ]
    if role == "reduce":
        rows = _REDUCE_CONFIGS.get((tune, family), _REDUCE_CONFIGS[tune])
        return [triton.Config(dict(BLOCK_M=bm), num_warps=w, num_stages=s) for bm, w, s in rows]
    raise ValueError(f"unknown launch role {role!r}")


_KERNELS = {"gemm": _stitched_gemm_kernel, "thin": _stitched_gemm_kernel, "reduce": _row_reduce_kernel,
            "tma": hopper_gemm._persistent_gemm_kernel, "tma_thin": hopper_gemm._persistent_gemm_kernel}
_AUTOTUNE_KEYS = {"gemm": ["M_BUCKET", "N", "K"], "thin": ["M_BUCKET", "N", "K"],
                  "reduce": ["M_BUCKET", "P", "Q", "S"], "tma": ["M_BUCKET", "N", "K", "R"],
                  "tma_thin": ["M_BUCKET", "N", "K"]}


@functools.lru_cache(maxsize=None)
def _autotuner(role: str, family: str, tune: str, enabled: bool):
    configs = autotune_configs(role, family, tune)
    # a G_JOBS launch counts its g jobs in `ready_ptr`: every timed run starts from the zeroed buffer
    restore = ["ready_ptr"] if tune == "gjobs" else None
    return triton.autotune(configs=configs if enabled else configs[:1], key=_AUTOTUNE_KEYS[role],
                           restore_value=restore)(_KERNELS[role])


# ------------------------------------------------------------------------------------------- dispatch
def _tma_legal(t: Tensor) -> bool:
    """A 2-D tensor a tensor descriptor can address: unit last stride, 16-byte-aligned row stride and base
    (a meta tensor has no address: its base counts as aligned, as a fresh allocation is)."""
    if t.dim() != 2 or t.stride(1) != 1 or t.shape[1] < 1:
        return False
    if (t.stride(0) * t.element_size()) % 16 or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        return False
    return t.device.type == "meta" or t.data_ptr() % 16 == 0


def tma_path(arch: Optional[int], x: Tensor, weight: Tensor, out_cols: int) -> bool:
    """The dispatch rule between the Hopper path and the pointer kernel, for the forward and the backward.

    The Hopper path (persistent kernel, tensor descriptors) runs when all of these hold:
      - arch is 90 (sm_90: H100/H200). Ampere (sm_80) has no TMA; newer archs are not tuned here and keep
        the pointer kernel until they are measured;
      - x (the forward's x, or the backward's dy) is float16 or bfloat16 and the weight has its dtype
        (float32 runs the pointer kernel: its IEEE dots need CUDA-core loops, TF32 needs torch's consent);
      - x and the weight are 2-D with a unit last stride, a 16-byte-aligned row stride and a 16-byte-aligned
        base address (TMA's rules; e.g. K = 37 in 16-bit fails them), and out_cols (the width of the fresh,
        contiguous output: N forward, K for dx) gives 16-byte rows too.
    Everything else (float32, misaligned or strided views, odd widths, sm_80) runs the pointer kernel.
    Rank, stitch count and M do not matter: the LoRA and stitch operands are read with pointer loads.
    """
    if arch != 90 or x.dtype not in _LOWP or weight.dtype != x.dtype:
        return False
    if (out_cols * x.element_size()) % 16 or out_cols < 1:
        return False
    return _tma_legal(x) and _tma_legal(weight)


def _arch(device: torch.device, interpreter: bool) -> Optional[int]:
    """The arch the dispatch rule sees: the GPU's compute capability x10; ESTA_TRITON_ARCH overrides it (80
    sends a Hopper GPU down the pointer path; 90 runs the Hopper path in the interpreter, whose default is
    the pointer path)."""
    forced = os.environ.get("ESTA_TRITON_ARCH")
    if forced:
        return int(forced)
    if interpreter or device.type != "cuda":
        return None
    major, minor = device_capability(device.index)
    return 10 * major + minor


def g_mode() -> str:
    """ESTA_TRITON_G: "fused" (default: on the Hopper path the dx launch also computes g = scale * dy @ B,
    so dy is read once for both) or "thin" (g by a thin GEMM before dx, as the pointer path does)."""
    mode = os.environ.get("ESTA_TRITON_G", "fused")
    if mode not in ("thin", "fused"):
        raise ValueError(f"ESTA_TRITON_G={mode!r}: expected 'thin' or 'fused'")
    return mode


def g_ready_buffer(M: int, device: torch.device) -> Tensor:
    """The zeroed int32 schedule buffer of a G_JOBS launch: element 0 the schedule check, then one counter
    per row block of the smallest BLOCK_M any config (or the interpreter) uses."""
    block_m = min(min(c[0] for c in hopper_gemm.MAIN_CONFIGS), _INTERPRETER_META["tma"]["BLOCK_M"])
    return torch.zeros(1 + triton.cdiv(M, block_m), dtype=torch.int32, device=device)


def xa_mode() -> str:
    """ESTA_TRITON_XA: "thin" (default: xa = x @ A.T by a thin GEMM before the main kernel) or "fused" (the
    Hopper main kernel accumulates xa beside y, for ranks up to 32)."""
    mode = os.environ.get("ESTA_TRITON_XA", "thin")
    if mode not in ("thin", "fused"):
        raise ValueError(f"ESTA_TRITON_XA={mode!r}: expected 'thin' or 'fused'")
    return mode


# ------------------------------------------------------------------------------------------------ plans
class Launch(NamedTuple):
    """One kernel launch, computed from shapes only: `args` are the runtime arguments by name, `meta` the
    constexprs the launcher fixes (the autotuner adds the rest), `grid` maps the full meta to a grid,
    `tune` names the autotune config list (see autotune_configs)."""

    role: str
    args: Dict[str, Any]
    meta: Dict[str, Any]
    grid: Callable[[Dict[str, Any]], Tuple[int, ...]]
    tune: str


def _pad16(n: int) -> int:
    return max(16, triton.next_power_of_2(max(n, 1)))


def _fp32_precision(x_dtype: torch.dtype) -> str:
    """input_precision of tl.dot for float32 activations: TF32 only where torch allows it for float32
    matmuls. (16-bit activations never run a float32 dot.)"""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _stride_ids(ids: Optional[Tensor]) -> int:
    # one id for every row: read it with stride 0
    return 0 if ids is None else (0 if ids.numel() == 1 else ids.stride(0))


def plan_gemm(a: Tensor, w: Tensor, out: Tensor, *, bias: Optional[Tensor] = None, xa: Optional[Tensor] = None,
              up: Optional[Tensor] = None, stitch_bias: Optional[Tensor] = None, ids: Optional[Tensor] = None,
              flag: Optional[Tensor] = None, main_scale: float = 1.0, lora_scale: float = 1.0, thin: bool = False,
              interpreter: bool = False) -> Launch:
    """Pointer kernel: out (M, N) = main_scale * a (M, K) @ w (K, N) + lora_scale * xa (M, R) @ up (R, N)
    + bias + sb[ids]. w and up are views (any strides); `thin` marks a GEMM whose N is a LoRA rank."""
    M, K = a.shape
    N = w.shape[1]
    R = 0 if xa is None else xa.shape[1]
    S = 0 if stitch_bias is None else stitch_bias.shape[0]
    has_stitch = stitch_bias is not None and ids is not None
    lowp = a.dtype in _LOWP
    max_block_r = _INTERPRETER_MAX_BLOCK_R if interpreter else 32
    meta = dict(
        HAS_BIAS=bias is not None, HAS_LORA=xa is not None and R > 0, HAS_STITCH=has_stitch,
        LOWP=lowp, PRECISION=_fp32_precision(a.dtype), BLOCK_R=min(_pad16(R), max_block_r),
    )
    if thin:
        meta["BLOCK_N"] = min(_pad16(N), 64)
    args = dict(
        a_ptr=a, w_ptr=w, out_ptr=out, bias_ptr=bias, xa_ptr=xa, up_ptr=up,
        sb_ptr=stitch_bias if has_stitch else None, ids_ptr=ids if has_stitch else None,
        flag_ptr=flag if has_stitch else None,
        M=M, N=N, K=K, R=R, S=S, M_BUCKET=triton.next_power_of_2(max(M, 1)),
        stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_wk=w.stride(0), stride_wn=w.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1),
        stride_bias=0 if bias is None else bias.stride(0),
        stride_xam=0 if xa is None else xa.stride(0), stride_xar=0 if xa is None else xa.stride(1),
        stride_ur=0 if up is None else up.stride(0), stride_un=0 if up is None else up.stride(1),
        stride_sbs=stitch_bias.stride(0) if has_stitch else 0,
        stride_sbn=stitch_bias.stride(1) if has_stitch else 0,
        stride_ids=_stride_ids(ids) if has_stitch else 0,
        main_scale=float(main_scale), lora_scale=float(lora_scale),
    )

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)

    tune = "16bit" if lowp else "fp32"
    if not thin and has_stitch and lowp:
        # the gathered stitch-bias tile sits beside the accumulator: 128 x 256 tiles spill (sm_90)
        tune += "+heavy"
    return Launch("thin" if thin else "gemm", args, meta, grid, tune)


def plan_tma_gemm(a: Tensor, b: Tensor, out: Tensor, *, b_kmajor: bool, bias: Optional[Tensor] = None,
                  lo: Optional[Tensor] = None, up: Optional[Tensor] = None, la: Optional[Tensor] = None,
                  lo_out: Optional[Tensor] = None, stitch_bias: Optional[Tensor] = None,
                  ids: Optional[Tensor] = None, flag: Optional[Tensor] = None, main_scale: float = 1.0,
                  lo_scale: float = 1.0, lo_out_scale: float = 1.0, thin: bool = False, interpreter: bool = False,
                  num_sms: int = 132, gb: Optional[Tensor] = None, ready: Optional[Tensor] = None,
                  g_scale: float = 1.0) -> Launch:
    """Hopper path (hopper_gemm._persistent_gemm_kernel): out (M, N) = main_scale * a @ B + lo_scale *
    lo @ up + bias + sb[ids], B = b.T (b_kmajor: b is (N, K)) or b ((K, N)). With `la` (the fused variant)
    lo = a @ la.T is accumulated in the main loop and lo_out receives lo_out_scale * lo. a, b and out must
    pass tma_path's rules; `thin` marks a GEMM whose N is a LoRA rank (BLOCK_N = the padded rank).
    With `gb` (the backward's dx, b given as (K, N)) the launch also computes lo = g_scale * a @ gb (gb
    (K, R) in a's dtype, lo the float32 (M, R) buffer it writes) in g jobs before the tiles that use it;
    `ready` is its zeroed int32 schedule buffer (g_ready_buffer)."""
    M, K = a.shape
    N = b.shape[0] if b_kmajor else b.shape[1]
    fused = la is not None
    R = la.shape[0] if fused else (0 if lo is None else lo.shape[1])
    S = 0 if stitch_bias is None else stitch_bias.shape[0]
    has_stitch = stitch_bias is not None and ids is not None
    # the unfused LoRA tail loops over the rank 16 at a time: its two tiles are staged in shared memory
    # beside the main loop's stages and the output tile (at r = 256, 64-wide chunks overflowed sm_90's
    # 227 KB with 128 x 256 tiles)
    block_r = _pad16(R) if fused else 16
    g_jobs = gb is not None
    if g_jobs and (b_kmajor or fused or thin or ready is None or lo is None or up is None or R == 0):
        raise ValueError("plan_tma_gemm: g jobs need b as (K, N), the g buffer `lo`, the factor `up`, a rank > 0 "
                         "and `ready`")
    # the interpreter runs programs one after another: a G_JOBS launch runs as one program there (a later
    # program's g jobs would not have run when an earlier one's tile needs them), and never polls
    sms = (1 if g_jobs else _INTERPRETER_NUM_SMS) if interpreter else num_sms
    meta = dict(B_KMAJOR=b_kmajor, HAS_BIAS=bias is not None, HAS_LORA=R > 0 and up is not None, FUSE_LO=fused,
                HAS_STITCH=has_stitch, BLOCK_R=block_r, NUM_SMS=sms, G_JOBS=g_jobs,
                BLOCK_G=min(_pad16(R), _INTERPRETER_MAX_BLOCK_R if interpreter else G_MAX_BLOCK) if g_jobs else 16,
                MAX_POLLS=0 if interpreter or not g_jobs else G_MAX_POLLS)
    tune = ""
    if g_jobs:
        tune = "gjobs"
    elif thin:
        meta["BLOCK_N"] = min(_pad16(N), 256)
        tune = "narrow" if meta["BLOCK_N"] <= 64 else "wide"
    else:
        tune = "fused" if fused else ""
        if has_stitch and stitch_bias.dtype == torch.float32:
            tune += "+heavy"
    args = dict(
        a_ptr=a, b_ptr=b, out_ptr=out, bias_ptr=bias, lo_ptr=None if fused else lo, up_ptr=up,
        la_ptr=la, lo_out_ptr=lo_out if fused else None,
        sb_ptr=stitch_bias if has_stitch else None, ids_ptr=ids if has_stitch else None,
        flag_ptr=flag if has_stitch else None,
        M=M, N=N, K=K, R=R, S=S, M_BUCKET=triton.next_power_of_2(max(M, 1)),
        stride_am=a.stride(0), stride_b=b.stride(0), stride_om=out.stride(0),
        stride_bias=0 if bias is None else bias.stride(0),
        stride_lom=lo.stride(0) if lo is not None and not fused else 0,
        stride_up=up.stride(0) if up is not None and not fused else 0,
        stride_ur=0 if up is None else up.stride(0), stride_un=0 if up is None else up.stride(1),
        stride_lar=la.stride(0) if fused else 0, stride_lak=la.stride(1) if fused else 0,
        stride_loom=lo_out.stride(0) if fused else 0, stride_loor=lo_out.stride(1) if fused else 0,
        stride_sbs=stitch_bias.stride(0) if has_stitch else 0,
        stride_sbn=stitch_bias.stride(1) if has_stitch else 0,
        stride_ids=_stride_ids(ids) if has_stitch else 0,
        main_scale=float(main_scale), lo_scale=float(lo_scale), lo_out_scale=float(lo_out_scale),
        gb_ptr=gb, ready_ptr=ready, stride_gb=gb.stride(0) if g_jobs else 0, g_scale=float(g_scale),
    )

    def grid(m):
        row_blocks = triton.cdiv(M, m["BLOCK_M"])
        tiles = row_blocks * triton.cdiv(N, m["BLOCK_N"])
        if m["G_JOBS"]:
            tiles += row_blocks * triton.cdiv(R, m["BLOCK_G"])
        return (min(m["NUM_SMS"], tiles),)

    return Launch("tma_thin" if thin else "tma", args, meta, grid, tune)


def plan_row_reduce(l: Tensor, r: Optional[Tensor], *, ids: Optional[Tensor] = None, num_stitches: int = 0,
                    flag: Optional[Tensor] = None, scale: float = 1.0, interpreter: bool = False,
                    num_sms: int = 132) -> Tuple[Launch, Optional[Tensor], Optional[Tensor]]:
    """Plans out[split] (P, Q) = scale * l (M, P).T @ r (M, Q) and sout[split] (S, P) = onehot(ids).T @ l,
    and allocates those float32 partial buffers (splits, ., .) on l's device. Returns (plan, out, sout).
    A right operand up to 256 wide is one tile, so each program reads its l rows once."""
    M, P = l.shape
    Q = 0 if r is None else r.shape[1]
    S = num_stitches if ids is not None else 0
    has_r, has_stitch = Q > 0, S > 0
    l_lowp = l.dtype in _LOWP
    r_lowp = has_r and r.dtype in _LOWP
    lowp = 1 if l_lowp else (2 if r_lowp else 0)
    block_p = min(_pad16(P), 64)
    block_q = min(_pad16(Q), 16 if interpreter else _REDUCE_MAX_BLOCK_Q)
    block_s = min(_pad16(S), _INTERPRETER_MAX_BLOCK_S if interpreter else 64)
    jobs = max(triton.cdiv(Q, block_q), triton.cdiv(S, block_s))
    rows_per_split, splits = row_splits(M, triton.cdiv(P, block_p) * jobs, interpreter, num_sms)
    # a rank-sized last dimension gets a row stride of at least 16 (see _rank_buffer)
    out = torch.empty((splits, P, max(Q, 16)), dtype=_ACC, device=l.device)[:, :, :Q] if has_r else None
    sout = torch.empty((splits, S, P), dtype=_ACC, device=l.device) if has_stitch else None
    meta = dict(
        HAS_R=has_r, HAS_STITCH=has_stitch, LOWP=lowp, PRECISION=_fp32_precision(l.dtype),
        STITCH_FP32=l.dtype == torch.float32, BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_S=block_s,
    )
    args = dict(
        l_ptr=l, r_ptr=r if has_r else None, ids_ptr=ids if has_stitch else None, out_ptr=out, sout_ptr=sout,
        flag_ptr=flag if has_stitch else None,
        M=M, P=P, Q=Q, S=S, ROWS_PER_SPLIT=rows_per_split, M_BUCKET=triton.next_power_of_2(max(M, 1)),
        stride_lm=l.stride(0), stride_lp=l.stride(1),
        stride_rm=r.stride(0) if has_r else 0, stride_rq=r.stride(1) if has_r else 0,
        stride_ids=_stride_ids(ids) if has_stitch else 0,
        stride_o_split=out.stride(0) if has_r else 0, stride_op=out.stride(1) if has_r else 0,
        stride_oq=out.stride(2) if has_r else 0,
        stride_so_split=sout.stride(0) if has_stitch else 0, stride_sos=sout.stride(1) if has_stitch else 0,
        stride_sop=sout.stride(2) if has_stitch else 0,
        scale=float(scale),
    )
    fma = (lowp == 0 and meta["PRECISION"] == "ieee") or (has_stitch and meta["STITCH_FP32"])
    tune = "fma" if fma else ("wide" if block_q > 64 else "mma")
    plan = Launch("reduce", args, meta, lambda m: (triton.cdiv(P, block_p), jobs, splits), tune)
    return plan, out, sout


def row_splits(M: int, tiles: int, interpreter: bool, num_sms: int) -> Tuple[int, int]:
    """(rows per split, number of splits) for a reduction over M with `tiles` programs per split: about two
    waves of programs, each split at least 512 rows (in the interpreter: small splits, to test them)."""
    block = _INTERPRETER_META["reduce"]["BLOCK_M"] if interpreter else _REDUCE_MAX_BLOCK_M
    if interpreter:
        want = min(3, triton.cdiv(M, 2 * block))
    else:
        want = min(triton.cdiv(2 * num_sms, max(tiles, 1)), triton.cdiv(M, 512))
    want = max(want, 1)
    rows = triton.cdiv(triton.cdiv(M, want), block) * block
    return rows, triton.cdiv(M, rows)


def _rank_buffer(M: int, r: int, device: torch.device, dtype: torch.dtype = _ACC) -> Tensor:
    """An (M, r) buffer whose rows are padded to 16 bytes (tensor descriptors need 16-byte-aligned rows;
    and a contiguous (M, 1) tensor would have two unit strides)."""
    per16 = 16 // torch.empty((), dtype=dtype, device="meta").element_size()
    return torch.empty((M, triton.cdiv(max(r, 1), per16) * per16), dtype=dtype, device=device)[:, :r]


def _lowp_factor(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A LoRA factor in the activation dtype with 16-byte-aligned rows (a copy unless it already is)."""
    if t.dtype == dtype and _tma_legal(t):
        return t
    out = _rank_buffer(t.shape[0], t.shape[1], t.device, dtype)
    return out.copy_(t)


class ForwardPlan(NamedTuple):
    """The launches of one forward (in order) and the tensors they write."""
    launches: List[Tuple[str, Launch]]
    y: Tensor
    xa: Tensor
    flag: Optional[Tensor]
    path: str


def plan_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Optional[Tensor],
                 lora_b: Optional[Tensor], stitch_bias: Optional[Tensor], ids: Optional[Tensor], scale: float, *,
                 arch: Optional[int], interpreter: bool = False, num_sms: int = 132,
                 mode: str = "thin") -> ForwardPlan:
    """Allocates y, xa (and the bad-id flag) on x's device and plans the forward's launches: the Hopper
    path when tma_path(...) holds, else the pointer kernels. Works on meta tensors (the compile tests and
    esta_kernels.inspect plan with them)."""
    M, K = x.shape
    N = weight.shape[0]
    r = 0 if lora_a is None else lora_a.shape[0]
    dev = x.device
    y = torch.empty((M, N), dtype=x.dtype, device=dev)
    has_stitch = stitch_bias is not None and ids is not None
    flag = new_bad_id_flag(dev) if has_stitch else None
    use_tma = tma_path(arch, x, weight, N)
    fused = use_tma and mode == "fused" and 0 < r <= 32 and N > 0
    xa = _rank_buffer(M, r, dev) if use_tma else torch.empty((M, r), dtype=_ACC, device=dev)
    launches = []
    if M == 0:
        return ForwardPlan(launches, y, xa, flag, "tma" if use_tma else "pointer")
    sb = stitch_bias if has_stitch else None
    if use_tma:
        if r and not fused:
            launches.append(("xa", plan_tma_gemm(x, _lowp_factor(lora_a, x.dtype), xa, b_kmajor=True, thin=True,
                                                 interpreter=interpreter, num_sms=num_sms)))
        if N:
            launches.append(("y", plan_tma_gemm(
                x, weight, y, b_kmajor=True, bias=bias, lo=xa if r and not fused else None,
                up=(lora_b.t() if fused else _lowp_factor(lora_b, x.dtype)) if r else None, la=lora_a if fused else None, lo_out=xa if fused else None,
                stitch_bias=sb, ids=ids, flag=flag, lo_scale=scale, interpreter=interpreter, num_sms=num_sms)))
        return ForwardPlan(launches, y, xa, flag, "tma-fused-xa" if fused else "tma")
    if r:
        launches.append(("xa", plan_gemm(x, lora_a.t(), xa, thin=True, interpreter=interpreter)))
    if N:
        launches.append(("y", plan_gemm(x, weight.t(), y, bias=bias, xa=xa if r else None,
                                        up=lora_b.t() if r else None, stitch_bias=sb, ids=ids, flag=flag,
                                        lora_scale=scale, interpreter=interpreter)))
    return ForwardPlan(launches, y, xa, flag, "pointer")


class BackwardPlan(NamedTuple):
    """The launches of one backward (in order), the tensors they write, and `finish`, which turns the
    written buffers into (dx, d lora_a, d lora_b, d stitch_bias) after the launches ran."""
    launches: List[Tuple[str, Launch]]
    finish: Callable[[], Tuple[Tensor, Tensor, Tensor, Tensor]]
    flag: Optional[Tensor]
    path: str


def plan_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Optional[Tensor], lora_b: Optional[Tensor],
                  lora_xa: Tensor, ids: Optional[Tensor], num_stitches: int, scale: float,
                  output_mask: Sequence[bool], *, arch: Optional[int], interpreter: bool = False,
                  num_sms: int = 132, mode: str = "fused") -> BackwardPlan:
    """Allocates the backward's outputs and partial buffers and plans its launches (see the module
    docstring). dy has x's dtype; ids are given only when d stitch_bias is wanted."""
    M, K = x.shape
    N = weight.shape[0]
    dev = x.device
    need_dx, need_da, need_db, need_ds = (bool(v) for v in output_mask)
    r = 0 if lora_a is None else lora_a.shape[0]
    use_tma = tma_path(arch, dy, weight, K)

    def zeros_or_empty(wanted: bool, shape: Tuple[int, ...]) -> Tensor:
        # a fresh tensor each: a custom op's outputs may not alias one another
        return torch.zeros(shape if wanted else (0,), dtype=_ACC, device=dev)

    dx = torch.empty((M, K), dtype=x.dtype, device=dev) if need_dx else x.new_empty((0,))
    d_a = zeros_or_empty(bool(r) and need_da, (r, K))
    d_b = zeros_or_empty(bool(r) and need_db, (N, r))
    d_s = zeros_or_empty(need_ds, (num_stitches, N))
    launches: List[Tuple[str, Launch]] = []
    want_s = ids is not None and need_ds and num_stitches > 0 and N > 0
    flag = new_bad_id_flag(dev) if want_s else None
    if M == 0:
        return BackwardPlan(launches, lambda: (dx, d_a, d_b, d_s), flag, "tma" if use_tma else "pointer")

    g = None
    # mode "fused": on the Hopper path the dx launch writes g as well (its g jobs), when dx is wanted
    g_in_dx = bool(r) and use_tma and need_dx and K > 0 and mode == "fused"
    if r and (need_dx or need_da):
        g = _rank_buffer(M, r, dev)  # with g_in_dx, written by the dx launch's g jobs
        if use_tma and not g_in_dx:
            launches.append(("g", plan_tma_gemm(dy, _lowp_factor(lora_b, dy.dtype), g, b_kmajor=False,
                                                main_scale=scale, thin=True, interpreter=interpreter,
                                                num_sms=num_sms)))
        elif not use_tma:
            launches.append(("g", plan_gemm(dy, lora_b, g, main_scale=scale, thin=True, interpreter=interpreter)))
    if need_dx and K:
        if use_tma:
            # with g_in_dx the launch's g jobs compute g (gb, ready); else it reads the thin launch's
            launches.append(("dx", plan_tma_gemm(
                dy, weight, dx, b_kmajor=False, lo=g, up=_lowp_factor(lora_a, dy.dtype) if r else None,
                gb=_lowp_factor(lora_b, dy.dtype) if g_in_dx else None,
                ready=g_ready_buffer(M, dev) if g_in_dx else None, g_scale=scale,
                interpreter=interpreter, num_sms=num_sms)))
        else:
            launches.append(("dx", plan_gemm(dy, weight, dx, xa=g, up=lora_a if r else None,
                                             interpreter=interpreter)))
    want_b = bool(r) and need_db and N > 0
    parts_b = parts_s = parts_a = None
    if want_b or want_s:
        xa = lora_xa
        if want_b and xa.stride(0) % 16 and M > 1:
            xa = _rank_buffer(M, r, dev).copy_(lora_xa)
        plan, parts_b, parts_s = plan_row_reduce(
            dy, xa if want_b else None, ids=ids if want_s else None, num_stitches=num_stitches if want_s else 0,
            flag=flag, scale=scale, interpreter=interpreter, num_sms=num_sms)
        launches.append(("dlora_b+dstitch", plan))
    if r and need_da and K:
        # d A^T = x^T @ g: x is the left operand, read once whatever the rank
        plan, parts_a, _ = plan_row_reduce(x, g, interpreter=interpreter, num_sms=num_sms)
        launches.append(("dlora_a", plan))

    def finish():
        out_b = _sum_splits(parts_b) if want_b else d_b
        out_s = _sum_splits(parts_s) if want_s else d_s
        out_a = _sum_splits(parts_a).t().contiguous() if parts_a is not None else d_a
        return dx, out_a, out_b, out_s

    return BackwardPlan(launches, finish, flag, ("tma-fused-g" if g_in_dx else "tma") if use_tma else "pointer")


# --------------------------------------------------------------------------------------------- launching
_SCRATCH_DEVICE = [torch.device("cpu")]


def _tma_scratch(size: int, alignment: int, stream: Optional[int]) -> Tensor:
    # global memory for the descriptors tl.make_tensor_descriptor builds (a few hundred bytes per launch)
    return torch.empty(size, dtype=torch.int8, device=_SCRATCH_DEVICE[0])


def _ensure_tma_allocator(device: torch.device) -> None:
    """Tensor descriptors made in a kernel need triton's allocator; set ours unless the caller set one."""
    from triton.runtime import _allocation

    _SCRATCH_DEVICE[0] = device
    current = _allocation._allocator.get()
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


def _launch(plan: Launch, device: torch.device) -> None:
    if plan.role in ("tma", "tma_thin"):
        _ensure_tma_allocator(device)
    if interpreting(_stitched_gemm_kernel, device, "stitched_linear"):
        kernel = _KERNELS[plan.role]
        meta = {**_INTERPRETER_META[plan.role], **plan.meta}
        kernel[plan.grid(meta)](**plan.args, **meta)
        return
    family, _ = device_info(device.index)
    tuner = _autotuner(plan.role, family, plan.tune, autotune_enabled())
    with torch.cuda.device(device):
        tuner[plan.grid](**plan.args, **plan.meta)


def _num_sms(device: torch.device) -> int:
    return 132 if device.type != "cuda" else device_info(device.index)[1]


def _sum_splits(partials: Optional[Tensor]) -> Optional[Tensor]:
    # torch sums the per-split partials in a fixed order: deterministic, unlike float atomics
    if partials is None:
        return None
    return partials[0].contiguous() if partials.shape[0] == 1 else partials.sum(0)


def _check_common(name: str, x: Tensor, weight: Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: the triton backend supports float32, float16 and bfloat16, got {x.dtype}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: expected x (M, K) and weight (N, K), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{name}: x and weight must share one dtype, got {x.dtype} and {weight.dtype}")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name}: tensors must be on CUDA (or the CPU under TRITON_INTERPRET=1), got {x.device}")


def _prepare_ids(name: str, ids: Optional[Tensor], M: int, num_stitches: int) -> Optional[Tensor]:
    """Checks the ids' shape and dtype, and their range when they live in host memory (before any output is
    written); GPU ids are range-checked by the kernels' flag, without a sync."""
    if ids is None:
        return None
    if ids.dim() != 1 or ids.numel() not in (1, M):
        raise ValueError(f"{name}: stitch_ids must be 1-D with M = {M} elements or 1 element, "
                         f"got shape {tuple(ids.shape)}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{name}: stitch_ids must be int64, got {ids.dtype}")
    if ids_checked_on_host(ids):
        check_ids_range(ids, num_stitches)
    return ids


def _run(launches: List[Tuple[str, Launch]], flag: Optional[Tensor], num_stitches: int,
         device: torch.device) -> None:
    for _, plan in launches:
        _launch(plan, device)
    if flag is not None:
        report_bad_ids(flag, num_stitches)


# ---------------------------------------------------------------------------------------- entry points
def triton_stitched_linear_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor],
    stitch_bias: Optional[Tensor], stitch_ids: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor]:
    """(y (M, N) in x.dtype, lora_xa = x @ lora_a.T (M, r) float32; (M, 0) without LoRA)."""
    name = "stitched_linear (triton)"
    _check_common(name, x, weight)
    M = x.shape[0]
    if (lora_a is None) != (lora_b is None):
        raise ValueError(f"{name}: lora_a and lora_b must be given together (or both None)")
    ids = None
    if stitch_bias is not None and stitch_ids is not None:
        ids = _prepare_ids(name, stitch_ids, M, stitch_bias.shape[0])
    dev = x.device
    interp = interpreting(_stitched_gemm_kernel, dev, "stitched_linear")
    plan = plan_forward(x, weight, bias, lora_a, lora_b, stitch_bias if ids is not None else None, ids, scale,
                        arch=_arch(dev, interp), interpreter=interp, num_sms=_num_sms(dev), mode=xa_mode())
    _run(plan.launches, plan.flag, 0 if stitch_bias is None else stitch_bias.shape[0], dev)
    return plan.y, plan.xa


def triton_stitched_linear_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Optional[Tensor], lora_b: Optional[Tensor],
    lora_xa: Tensor, stitch_ids: Optional[Tensor], num_stitches: int, scale: float, output_mask: Sequence[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx (M, K) x.dtype, d lora_a (r, K), d lora_b (N, r), d stitch_bias (S, N)), the last three float32;
    an output not asked for by output_mask (or a LoRA grad without LoRA) is an empty (0,) tensor."""
    name = "stitched_linear_backward (triton)"
    _check_common(name, x, weight)
    M, K = x.shape
    N = weight.shape[0]
    if grad_y.shape != (M, N):
        raise ValueError(f"{name}: grad_y must have shape ({M}, {N}), got {tuple(grad_y.shape)}")
    r = 0 if lora_a is None else lora_a.shape[0]
    if r and tuple(lora_xa.shape) != (M, r):
        raise ValueError(f"{name}: lora_xa must have shape ({M}, {r}), got {tuple(lora_xa.shape)}")
    dev = x.device
    interp = interpreting(_stitched_gemm_kernel, dev, "stitched_linear")
    dy = grad_y if grad_y.dtype == x.dtype else grad_y.to(x.dtype)
    need_ds = bool(output_mask[3])
    ids = _prepare_ids(name, stitch_ids, M, num_stitches) if need_ds and num_stitches > 0 else None
    plan = plan_backward(dy, x, weight, lora_a, lora_b, lora_xa, ids, num_stitches, scale, output_mask,
                         arch=_arch(dev, interp), interpreter=interp, num_sms=_num_sms(dev), mode=g_mode())
    _run(plan.launches, plan.flag, num_stitches, dev)
    return plan.finish()
