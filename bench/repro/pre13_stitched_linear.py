# A verbatim copy of esta_kernels/triton/stitched_linear.py at commit 69fd7ad (before issue 13), kept only
# for bench/repro/r1_crash.py, which replays the rank-1 crash of the H100 probe under compute-sanitizer.
# Not imported by esta_kernels.
"""Triton kernels of the fused stitched linear (the `triton` backend).

    y = x @ W.T + bias + scale * (x @ A.T) @ B.T + stitch_bias[ids]        (A = lora_a, B = lora_b)

Layers, as in Liger-Kernel: two private @triton.jit kernels, plans (argument sets and grids, computed from
tensor shapes only, so the compile test builds the very launches that run), host launchers that pick
block sizes, and the entry points called by the custom ops in esta_kernels/_ops.py.

Forward, two launches:
  1. xa = x @ A.T, (M, r) float32 (`_stitched_gemm_kernel` as a thin GEMM). It is memory-bound (reads x
     once): about 5% of the main GEMM for LLaMA shapes (M = 8192, K = N = 4096, r = 16), while computing
     it inside the main loop would redo it for every N tile (r_pad / BLOCK_N more tensor-core work) and
     still need one program per row block to write it out.
  2. y = x @ W.T (main loop over K), then in the epilogue + scale * xa @ B.T (a loop over r in BLOCK_R
     chunks), + bias, + stitch_bias[ids[m]] gathered per row.
Backward, four launches:
  g = scale * dy @ B (thin GEMM); dx = [dy | g] @ [W; A] (the main kernel again: main loop over N, LoRA
  tail over r); d B = scale * dy.T @ xa and d stitch_bias = onehot(ids).T @ dy in one pass over dy
  (`_row_reduce_kernel`); d A = g.T @ x (`_row_reduce_kernel`). The reductions over M are split into
  partial buffers summed by torch in a fixed order: deterministic, no float atomics.

Every float accumulates in float32. On NVIDIA GPUs each tl.dot dimension must be >= 16, so the rank and
the stitch count are padded to powers of two >= 16 and masked (the interpreter would accept less).
CUDA tensors run the JIT kernels through triton.autotune (configurations for Ampere and Hopper). Under
TRITON_INTERPRET=1 (set before triton is imported) the same kernels run in Triton's interpreter, on CPU
tensors too, with one small config. ESTA_TRITON_AUTOTUNE=0 skips autotuning (the first config of each
list runs).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from esta_kernels._validate import check_ids_range
from esta_kernels.triton._common import autotune_enabled, device_info, interpreting

_ACC = torch.float32
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _stitched_gemm_kernel(
    a_ptr, w_ptr, out_ptr, bias_ptr, xa_ptr, up_ptr, sb_ptr, ids_ptr,
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
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out (M, N) = main_scale * a (M, K) @ w (K, N) [+ lora_scale * xa (M, R) @ up (R, N)] [+ bias]
    [+ sb[ids[m]]]. M_BUCKET only keys the autotuner."""
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
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, w, acc)
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
            up = tl.load(up_ptrs, mask=r_mask[:, None], other=0.0).to(tl.float32)
            acc = tl.dot(xa, up, acc, input_precision=LORA_PRECISION)
            xa_ptrs += BLOCK_R * stride_xar
            up_ptrs += BLOCK_R * stride_ur

    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_bias)
        acc += bias.to(tl.float32)[None, :]

    if HAS_STITCH:
        # stride_ids is 0 when one id serves every row. Ids outside [0, S) (-1, or bad ones that escaped
        # the host check during CUDA-graph capture) add nothing and are never dereferenced.
        ids = tl.load(ids_ptr + rows * stride_ids)
        valid = (ids >= 0) & (ids < S)
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
    l_ptr, r_ptr, ids_ptr, out_ptr, sout_ptr,
    M, P, Q, S, ROWS_PER_SPLIT, M_BUCKET,
    stride_lm, stride_lp,
    stride_rm, stride_rq,
    stride_ids,
    stride_o_split, stride_op, stride_oq,
    stride_so_split, stride_sos, stride_sop,
    scale,
    HAS_R: tl.constexpr, HAS_STITCH: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, STITCH_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Reductions over the rows m of one split of M (program axis 2), written as float32 partials:
        out[split, p, q]  = scale * sum_m l[m, p] * r[m, q]            (HAS_R)
        sout[split, s, p] = sum_m [ids[m] == s] * l[m, p]               (HAS_STITCH; a one-hot matmul)
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
            if DOT_FP32:
                acc = tl.dot(lt.to(tl.float32), rt.to(tl.float32), acc, input_precision=PRECISION)
            else:
                acc = tl.dot(lt, rt, acc)
        if HAS_STITCH:
            ids = tl.load(ids_ptr + rows64 * stride_ids, mask=m_mask & (job * BLOCK_S < S), other=-1)
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
# Tuple fields: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages. Shared memory per stage is
# (BLOCK_M + BLOCK_N) * BLOCK_K * element size; every config fits the 163 KB of an A100 (sm_80) and the
# 227 KB of an H100 (sm_90), and no 16-bit one spills registers (tests/kernels/test_triton_compile.py checks
# both). 16-bit configs use BLOCK_K = 64 on Hopper (wgmma, deeper K per barrier) and 32 on Ampere
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
# A float32 stitch bias with 16-bit activations gathers a float32 (BLOCK_M, BLOCK_N) tile in the
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
# tiles in registers, so they take short row blocks.
_REDUCE_CONFIGS = {
    "mma": [(64, 4, 3), (128, 8, 3)],
    "fma": [(16, 4, 3), (32, 8, 3)],
}
_REDUCE_MAX_BLOCK_M = 128  # splits of M are multiples of every BLOCK_M above

# Under TRITON_INTERPRET=1 one small config (the interpreter runs each program in numpy). Dot dimensions
# stay >= 16 as on the GPU.
_INTERPRETER_META = {
    "gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
    "thin": dict(BLOCK_M=32, BLOCK_K=32, GROUP_M=1),
    "reduce": dict(BLOCK_M=32),
}
_INTERPRETER_MAX_BLOCK_R = 16  # small, so that tests with r > 16 cover the rank loop
_INTERPRETER_MAX_BLOCK_S = 16


def autotune_configs(role: str, family: str, tune: str) -> List[triton.Config]:
    """The triton.Config list of a launch role ("gemm", "thin", "reduce") on an arch family ("ampere",
    "hopper") for a tuning class (Launch.tune)."""
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
        return [triton.Config(dict(BLOCK_M=bm), num_warps=w, num_stages=s) for bm, w, s in _REDUCE_CONFIGS[tune]]
    raise ValueError(f"unknown launch role {role!r}")


_KERNELS = {"gemm": _stitched_gemm_kernel, "thin": _stitched_gemm_kernel, "reduce": _row_reduce_kernel}
_AUTOTUNE_KEYS = {"gemm": ["M_BUCKET", "N", "K"], "thin": ["M_BUCKET", "N", "K"],
                  "reduce": ["M_BUCKET", "P", "Q", "S"]}


@functools.lru_cache(maxsize=None)
def _autotuner(role: str, family: str, tune: str, enabled: bool):
    configs = autotune_configs(role, family, tune)
    return triton.autotune(configs=configs if enabled else configs[:1], key=_AUTOTUNE_KEYS[role])(_KERNELS[role])


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
    """input_precision of tl.dot on float32 operands: for float32 activations TF32 only where torch allows
    it for float32 matmuls; with 16-bit activations (float32 LoRA factors or intermediate) TF32 keeps more
    bits than the 16-bit result has."""
    if x_dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def plan_gemm(a: Tensor, w: Tensor, out: Tensor, *, bias: Optional[Tensor] = None, xa: Optional[Tensor] = None,
              up: Optional[Tensor] = None, stitch_bias: Optional[Tensor] = None, ids: Optional[Tensor] = None,
              main_scale: float = 1.0, lora_scale: float = 1.0, thin: bool = False,
              precision_dtype: Optional[torch.dtype] = None, interpreter: bool = False) -> Launch:
    """out (M, N) = main_scale * a (M, K) @ w (K, N) + lora_scale * xa (M, R) @ up (R, N) + bias + sb[ids].
    w and up are views (any strides); `thin` marks a GEMM whose N is a LoRA rank."""
    M, K = a.shape
    N = w.shape[1]
    R = 0 if xa is None else xa.shape[1]
    S = 0 if stitch_bias is None else stitch_bias.shape[0]
    has_stitch = stitch_bias is not None and ids is not None
    dot_fp32 = a.dtype == torch.float32 or w.dtype != a.dtype
    precision = _fp32_precision(precision_dtype or a.dtype)
    max_block_r = _INTERPRETER_MAX_BLOCK_R if interpreter else 32
    meta = dict(
        HAS_BIAS=bias is not None, HAS_LORA=xa is not None and R > 0, HAS_STITCH=has_stitch,
        DOT_FP32=dot_fp32, PRECISION=precision, LORA_PRECISION=precision,
        BLOCK_R=min(_pad16(R), max_block_r),
    )
    if thin:
        meta["BLOCK_N"] = min(_pad16(N), 64)
    args = dict(
        a_ptr=a, w_ptr=w, out_ptr=out, bias_ptr=bias, xa_ptr=xa, up_ptr=up,
        sb_ptr=stitch_bias if has_stitch else None, ids_ptr=ids if has_stitch else None,
        M=M, N=N, K=K, R=R, S=S, M_BUCKET=triton.next_power_of_2(max(M, 1)),
        stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_wk=w.stride(0), stride_wn=w.stride(1),
        stride_om=out.stride(0), stride_on=out.stride(1),
        stride_bias=0 if bias is None else bias.stride(0),
        stride_xam=0 if xa is None else xa.stride(0), stride_xar=0 if xa is None else xa.stride(1),
        stride_ur=0 if up is None else up.stride(0), stride_un=0 if up is None else up.stride(1),
        stride_sbs=stitch_bias.stride(0) if has_stitch else 0,
        stride_sbn=stitch_bias.stride(1) if has_stitch else 0,
        # one id for every row: read it with stride 0
        stride_ids=(0 if ids.numel() == 1 else ids.stride(0)) if has_stitch else 0,
        main_scale=float(main_scale), lora_scale=float(lora_scale),
    )

    def grid(m):
        return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)

    tune = "fp32" if dot_fp32 else "16bit"
    if not thin and has_stitch and stitch_bias.dtype == torch.float32 and a.dtype != torch.float32:
        tune += "+heavy"
    return Launch("thin" if thin else "gemm", args, meta, grid, tune)


def plan_row_reduce(l: Tensor, r: Optional[Tensor], *, ids: Optional[Tensor] = None, num_stitches: int = 0,
                    scale: float = 1.0, precision_dtype: Optional[torch.dtype] = None, interpreter: bool = False,
                    num_sms: int = 132) -> Tuple[Launch, Optional[Tensor], Optional[Tensor]]:
    """Plans out[split] (P, Q) = scale * l (M, P).T @ r (M, Q) and sout[split] (S, P) = onehot(ids).T @ l,
    and allocates those float32 partial buffers (splits, ., .) on l's device. Returns (plan, out, sout)."""
    M, P = l.shape
    Q = 0 if r is None else r.shape[1]
    S = num_stitches if ids is not None else 0
    has_r, has_stitch = Q > 0, S > 0
    dot_fp32 = l.dtype == torch.float32 or (has_r and r.dtype != l.dtype)
    block_p = min(_pad16(P), 64)
    block_q = min(_pad16(Q), 16 if interpreter else 64)
    block_s = min(_pad16(S), _INTERPRETER_MAX_BLOCK_S if interpreter else 64)
    jobs = max(triton.cdiv(Q, block_q), triton.cdiv(S, block_s))
    rows_per_split, splits = row_splits(M, triton.cdiv(P, block_p) * jobs, interpreter, num_sms)
    # a rank-sized last dimension gets a row stride of at least 16 (see _rank_buffer)
    out = torch.empty((splits, P, max(Q, 16)), dtype=_ACC, device=l.device)[:, :, :Q] if has_r else None
    sout = torch.empty((splits, S, P), dtype=_ACC, device=l.device) if has_stitch else None
    meta = dict(
        HAS_R=has_r, HAS_STITCH=has_stitch, DOT_FP32=dot_fp32,
        PRECISION=_fp32_precision(precision_dtype or l.dtype), STITCH_FP32=l.dtype == torch.float32,
        BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_S=block_s,
    )
    args = dict(
        l_ptr=l, r_ptr=r if has_r else None, ids_ptr=ids if has_stitch else None, out_ptr=out, sout_ptr=sout,
        M=M, P=P, Q=Q, S=S, ROWS_PER_SPLIT=rows_per_split, M_BUCKET=triton.next_power_of_2(max(M, 1)),
        stride_lm=l.stride(0), stride_lp=l.stride(1),
        stride_rm=r.stride(0) if has_r else 0, stride_rq=r.stride(1) if has_r else 0,
        stride_ids=(0 if ids.numel() == 1 else ids.stride(0)) if has_stitch else 0,
        stride_o_split=out.stride(0) if has_r else 0, stride_op=out.stride(1) if has_r else 0,
        stride_oq=out.stride(2) if has_r else 0,
        stride_so_split=sout.stride(0) if has_stitch else 0, stride_sos=sout.stride(1) if has_stitch else 0,
        stride_sop=sout.stride(2) if has_stitch else 0,
        scale=float(scale),
    )
    fma = (dot_fp32 and meta["PRECISION"] == "ieee") or (has_stitch and meta["STITCH_FP32"])
    plan = Launch("reduce", args, meta, lambda m: (triton.cdiv(P, block_p), jobs, splits), "fma" if fma else "mma")
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


# --------------------------------------------------------------------------------------------- launching
def _launch(plan: Launch, device: torch.device) -> None:
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


def _row_reduce(l: Tensor, r: Optional[Tensor], *, ids: Optional[Tensor] = None, num_stitches: int = 0,
                scale: float = 1.0, precision_dtype: torch.dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(scale * l.T @ r as (P, Q) float32 or None, onehot(ids).T @ l as (S, P) float32 or None)."""
    dev = l.device
    plan, out, sout = plan_row_reduce(l, r, ids=ids, num_stitches=num_stitches, scale=scale,
                                      precision_dtype=precision_dtype, interpreter=interpreting(_stitched_gemm_kernel, dev, "stitched_linear"),
                                      num_sms=_num_sms(dev))
    _launch(plan, dev)
    return _sum_splits(out), _sum_splits(sout)


def _sum_splits(partials: Optional[Tensor]) -> Optional[Tensor]:
    # torch sums the per-split partials in a fixed order: deterministic, unlike float atomics
    if partials is None:
        return None
    return partials[0].contiguous() if partials.shape[0] == 1 else partials.sum(0)


def _rank_buffer(M: int, r: int, device: torch.device) -> Tensor:
    """An (M, r) float32 buffer whose row stride is a multiple of 16 (aligned rows). A contiguous (M, 1)
    operand has both strides 1: with one, the backward reduction hit an illegal address on an H100 (Triton
    3.6, 16-bit dy, M > 1), while ranks >= 2 ran correctly; rank-1 operands take their layout instead."""
    return torch.empty((M, triton.cdiv(r, 16) * 16), dtype=_ACC, device=device)[:, :r]


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
    """Checks the ids' shape, dtype and range (before any output is written) and returns them."""
    if ids is None:
        return None
    if ids.dim() != 1 or ids.numel() not in (1, M):
        raise ValueError(f"{name}: stitch_ids must be 1-D with M = {M} elements or 1 element, "
                         f"got shape {tuple(ids.shape)}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{name}: stitch_ids must be int64, got {ids.dtype}")
    # Reading the ids syncs with the GPU, which CUDA-graph capture forbids; the kernels mask bad ids then.
    if not (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        check_ids_range(ids, num_stitches)
    return ids


# ---------------------------------------------------------------------------------------- entry points
def triton_stitched_linear_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor],
    stitch_bias: Optional[Tensor], stitch_ids: Optional[Tensor], scale: float,
) -> Tuple[Tensor, Tensor]:
    """(y (M, N) in x.dtype, lora_xa = x @ lora_a.T (M, r) float32; (M, 0) without LoRA)."""
    name = "stitched_linear (triton)"
    _check_common(name, x, weight)
    M, K = x.shape
    N = weight.shape[0]
    if (lora_a is None) != (lora_b is None):
        raise ValueError(f"{name}: lora_a and lora_b must be given together (or both None)")
    r = 0 if lora_a is None else lora_a.shape[0]
    ids = None
    if stitch_bias is not None and stitch_ids is not None:
        ids = _prepare_ids(name, stitch_ids, M, stitch_bias.shape[0])

    dev = x.device
    interp = interpreting(_stitched_gemm_kernel, dev, "stitched_linear")
    y = torch.empty((M, N), dtype=x.dtype, device=dev)
    xa = torch.empty((M, r), dtype=_ACC, device=dev)
    if M == 0:
        return y, xa
    if r:
        _launch(plan_gemm(x, lora_a.t(), xa, thin=True, precision_dtype=x.dtype, interpreter=interp), dev)
    if N:
        plan = plan_gemm(
            x, weight.t(), y, bias=bias, xa=xa if r else None, up=lora_b.t() if r else None,
            stitch_bias=stitch_bias if ids is not None else None, ids=ids, lora_scale=scale, interpreter=interp,
        )
        _launch(plan, dev)
    return y, xa


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
    need_dx, need_da, need_db, need_ds = (bool(v) for v in output_mask)
    r = 0 if lora_a is None else lora_a.shape[0]
    if r and tuple(lora_xa.shape) != (M, r):
        raise ValueError(f"{name}: lora_xa must have shape ({M}, {r}), got {tuple(lora_xa.shape)}")
    dev = x.device
    interp = interpreting(_stitched_gemm_kernel, dev, "stitched_linear")
    dy = grad_y if grad_y.dtype == x.dtype else grad_y.to(x.dtype)
    ids = _prepare_ids(name, stitch_ids, M, num_stitches) if need_ds and num_stitches > 0 else None

    def zeros_or_empty(wanted: bool, shape: Tuple[int, ...]) -> Tensor:
        # a fresh tensor each: a custom op's outputs may not alias one another
        return torch.zeros(shape if wanted else (0,), dtype=_ACC, device=dev)

    dx = torch.empty((M, K), dtype=x.dtype, device=dev) if need_dx else x.new_empty((0,))
    d_a = zeros_or_empty(bool(r) and need_da, (r, K))
    d_b = zeros_or_empty(bool(r) and need_db, (N, r))
    d_s = zeros_or_empty(need_ds, (num_stitches, N))
    if M == 0:
        return dx, d_a, d_b, d_s

    g = None
    if r and (need_dx or need_da):
        g = _rank_buffer(M, r, dev)
        _launch(plan_gemm(dy, lora_b, g, main_scale=scale, thin=True, precision_dtype=x.dtype,
                          interpreter=interp), dev)
    if need_dx and K:
        plan = plan_gemm(dy, weight, dx, xa=g, up=lora_a if r else None, interpreter=interp)
        _launch(plan, dev)
    want_b = bool(r) and need_db
    want_s = ids is not None and N > 0
    if (want_b or want_s) and N:
        xa = lora_xa
        if want_b and xa.stride(0) % 16 and M > 1:
            xa = _rank_buffer(M, r, dev).copy_(lora_xa)
        db, ds = _row_reduce(dy, xa if want_b else None, ids=ids if want_s else None,
                             num_stitches=num_stitches if want_s else 0, scale=scale, precision_dtype=x.dtype)
        if want_b:
            d_b = db
        if want_s:
            d_s = ds
    if r and need_da and K:
        d_a, _ = _row_reduce(g, x, scale=1.0, precision_dtype=x.dtype)
    return dx, d_a, d_b, d_s
