"""The Hopper (sm_90) GEMM of the stitched linear: one persistent kernel fed by tensor descriptors (TMA).

    out (M, N) = main_scale * a (M, K) @ b  [+ lo_scale * lo (M, R) @ up (R, N)] [+ bias] [+ sb[ids[m]]]

b is the weight in either orientation: (N, K) rows ("K-major", the forward's W and the LoRA factor A of
xa = x @ A.T) or (K, N) rows (the backward's W for dx = dy @ W, and lora_b for g = dy @ B). Every GEMM of the
op on the Hopper path is this kernel:
  forward   xa = x @ A.T (N = r, float32 out), then y = x @ W.T + scale * xa @ B.T + bias + sb[ids]
  backward  g  = scale * dy @ B and dx = dy @ W + g @ A in ONE launch (G_JOBS, the default; dy is read
            from memory once for both), or g by a thin launch before dx (ESTA_TRITON_G=thin)
With G_JOBS the launch runs two kinds of tile: g jobs (a BLOCK_M x BLOCK_G chunk of g, written as float32
and counted per row block with a release atomic) and dx tiles, whose LoRA tail waits (acquire) until the g
jobs of their row block are all counted. _g_job_coords orders them so that the wait is short: a group's
g jobs come before its dx tiles, and a dx tile waits only after its own main loop, which is at least as
long as a g job's. A wait is also bounded (MAX_POLLS): a tile whose g is still missing then computes it
itself, so progress never depends on all programs being resident (MPS limits, other streams). The g
buffer stays float32 for d lora_a.
With FUSE_LO the low-rank left factor is not read from memory but accumulated in the main loop
(lo = a @ la.T, a second, BLOCK_R-wide accumulator fed by the same a tiles) and written once per row block
by the tiles of the first column block; the launcher offers it for ranks up to one BLOCK_R (see
bench/README.md, "Where xa comes from", for when each variant should win).

Design, in the order the kernel runs:
  - a persistent grid (one program per SM, NUM_SMS programs) walks the output tiles in grouped order
    (GROUP_M row blocks share each column block of b while it is in L2);
  - x/dy, the weight and the output go through tensor descriptors made in the kernel
    (tl.make_tensor_descriptor: 16-byte-aligned base and row strides, unit last stride; the dispatch rule in
    stitched_linear.py sends everything else to the pointer kernel). TMA loads past the edges read zeros, so
    the K loop needs no masks; TMA stores clip at the edges;
  - the LoRA up-projection is one more MMA into the same accumulator after the main loop, in the operands'
    16-bit dtype (the float32 intermediate times its scale, rounded once): no TF32 anywhere on this path;
  - the epilogue adds the bias and gathers one stitch-bias row per output row (L2-resident), and clears
    flag_ptr for any id outside [-1, S) (it adds nothing for it and never reads out of bounds);
  - WARP_SPECIALIZE (an autotune knob) asks triton for producer/consumer warp groups on the tile loop.
Accumulation is float32 throughout. Dot dimensions are >= 16 (BLOCK_R and every block are padded).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of a linear tile index in grouped order."""
    per_group = GROUP_M * num_pid_n
    group = tile // per_group
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % rows_in_group
    pid_n = (tile % per_group) // rows_in_group
    return pid_m, pid_n


@triton.jit
def _g_job_coords(tile, num_pid_m, num_pid_n, g_chunks, GROUP_M: tl.constexpr):
    """(is a g job, row block, column block or g chunk) of a linear tile index of a G_JOBS launch.

    The tiles come in groups of GROUP_M row blocks (the last group may be shorter). A group lists first
    its g jobs (rows x g_chunks, row block fastest), then its output tiles in _tile_coords' order. So
    every output tile comes after the g jobs it waits for, and a group's g jobs read the same rows of a
    as its output tiles, at about the same time (they share them in L2). Programs take tiles in
    increasing order and all of them are resident (one per SM), so the smallest waiting tile always has
    its g jobs running or done: the waits end."""
    per_group = GROUP_M * (g_chunks + num_pid_n)
    group = tile // per_group
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    local = tile - group * per_group
    g_jobs = rows_in_group * g_chunks
    is_g = local < g_jobs
    local = tl.where(is_g, local, local - g_jobs)
    return is_g, first_m + local % rows_in_group, local // rows_in_group


@triton.jit
def _persistent_gemm_kernel(
    a_ptr, b_ptr, out_ptr, bias_ptr, lo_ptr, up_ptr, la_ptr, lo_out_ptr, sb_ptr, ids_ptr, flag_ptr,
    gb_ptr, ready_ptr,
    M, N, K, R, S, M_BUCKET,
    stride_am, stride_b, stride_om,
    stride_bias,
    stride_lom, stride_up,
    stride_ur, stride_un,
    stride_lar, stride_lak,
    stride_loom, stride_loor,
    stride_sbs, stride_sbn,
    stride_ids,
    stride_gb,
    main_scale, lo_scale, lo_out_scale, g_scale,
    B_KMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, FUSE_LO: tl.constexpr,
    HAS_STITCH: tl.constexpr, G_JOBS: tl.constexpr, BLOCK_G: tl.constexpr, MAX_POLLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr,
):
    """See the module docstring. M_BUCKET only keys the autotuner. With FUSE_LO, la (R, K) is the factor
    of lo = a @ la.T, lo_out (M, R) receives lo_out_scale * lo, and the LoRA term uses lo_scale * lo.
    With G_JOBS (the backward's dx, b given as (K, N)), lo is not an input: the launch also runs the jobs
    lo[:, chunk] = g_scale * a @ gb[:, chunk] (gb (K, R), BLOCK_G columns a job, float32 into lo_ptr),
    scheduled by _g_job_coords, and a tile's LoRA tail waits until every chunk of its row block is written
    (ready_ptr: zeroed int32s, element 1 + i counts the finished jobs of row block i). A tile polls the
    counter at most MAX_POLLS times (0 in the interpreter, whose programs run one after another); if g is
    still missing it computes g for its own rows (the same sums) and sets ready_ptr[0]."""
    dt = a_ptr.dtype.element_ty
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    if G_JOBS:
        g_chunks = tl.cdiv(R, BLOCK_G)
        num_tiles = num_pid_m * (num_pid_n + g_chunks)
        gb_desc = tl.make_tensor_descriptor(gb_ptr, shape=[K, R], strides=[stride_gb, 1],
                                            block_shape=[BLOCK_K, BLOCK_G])
    k_tiles = tl.cdiv(K, BLOCK_K)

    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    if B_KMAJOR:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[stride_om, 1],
                                         block_shape=[BLOCK_M, BLOCK_N])
    if HAS_LORA and not FUSE_LO:
        # the low-rank factors through descriptors too (float32 lo, 16-bit up in b's orientation): a
        # warp-specialized loop takes only descriptor loads. With G_JOBS lo is written by this launch's g
        # jobs (generic stores from other programs) and read with pointer loads instead
        if not G_JOBS:
            lo_desc = tl.make_tensor_descriptor(lo_ptr, shape=[M, R], strides=[stride_lom, 1],
                                                block_shape=[BLOCK_M, BLOCK_R])
        if B_KMAJOR:
            up_desc = tl.make_tensor_descriptor(up_ptr, shape=[N, R], strides=[stride_up, 1],
                                                block_shape=[BLOCK_N, BLOCK_R])
        else:
            up_desc = tl.make_tensor_descriptor(up_ptr, shape=[R, N], strides=[stride_up, 1],
                                                block_shape=[BLOCK_R, BLOCK_N])
    offs_r = tl.arange(0, BLOCK_R)
    offs_kk = tl.arange(0, BLOCK_K)

    for tile in tl.range(pid, num_tiles, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        if G_JOBS:
            is_g, pid_m, pid_n = _g_job_coords(tile, num_pid_m, num_pid_n, g_chunks, GROUP_M)
        else:
            is_g = False
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        offs_m = off_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        rows = offs_m.to(tl.int64)
        if G_JOBS and is_g:
            # a g job: lo[row block, chunk pid_n] = g_scale * a @ gb[:, chunk], then one release per job
            off_g = pid_n * BLOCK_G
            acc_g = tl.zeros((BLOCK_M, BLOCK_G), dtype=tl.float32)
            for ki in range(k_tiles):
                off_k = ki * BLOCK_K
                acc_g = tl.dot(a_desc.load([off_m, off_k]), gb_desc.load([off_k, off_g]), acc_g)
            offs_g = off_g + tl.arange(0, BLOCK_G)
            tl.store(lo_ptr + rows[:, None] * stride_lom + offs_g[None, :], acc_g * g_scale,
                     mask=m_mask[:, None] & (offs_g < R)[None, :])
            # every thread's stores are issued before the counter moves (release at GPU scope)
            tl.debug_barrier()
            tl.atomic_add(ready_ptr + 1 + pid_m, 1, sem="release", scope="gpu")
        else:
            off_n = pid_n * BLOCK_N
            offs_n = off_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            cols = offs_n.to(tl.int64)

            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if FUSE_LO:
                lo_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for ki in range(k_tiles):
                off_k = ki * BLOCK_K
                a = a_desc.load([off_m, off_k])
                if B_KMAJOR:
                    b = b_desc.load([off_n, off_k])
                    acc = tl.dot(a, b.T, acc)
                else:
                    b = b_desc.load([off_k, off_n])
                    acc = tl.dot(a, b, acc)
                if FUSE_LO:
                    ks = off_k + offs_kk
                    la = tl.load(la_ptr + offs_r[:, None] * stride_lar + ks.to(tl.int64)[None, :] * stride_lak,
                                 mask=(offs_r < R)[:, None] & (ks < K)[None, :], other=0.0)
                    lo_acc = tl.dot(a, la.to(dt).T, lo_acc)
            acc = acc * main_scale

            if HAS_LORA:
                if FUSE_LO:
                    # the first column block publishes lo (xa for the backward, or g)
                    lo_out_ptrs = lo_out_ptr + rows[:, None] * stride_loom + offs_r[None, :] * stride_loor
                    tl.store(lo_out_ptrs, lo_acc * lo_out_scale,
                             mask=m_mask[:, None] & (offs_r < R)[None, :] & (pid_n == 0))
                    up = tl.load(up_ptr + offs_r[:, None] * stride_ur + cols[None, :] * stride_un,
                                 mask=(offs_r < R)[:, None] & n_mask[None, :], other=0.0)
                    acc = tl.dot((lo_acc * lo_scale).to(dt), up.to(dt), acc)
                else:
                    if G_JOBS:
                        # wait (acquire at GPU scope, one thread, broadcast) until the g jobs of this row
                        # block have all written, polling at most MAX_POLLS times; once any tile has given
                        # up waiting (some program is not resident), no tile polls again
                        ready = tl.atomic_add(ready_ptr + 1 + pid_m, 0, sem="acquire", scope="gpu")
                        gave_up = tl.load(ready_ptr, volatile=True) != 0
                        polls = tl.where(gave_up, MAX_POLLS, 0)
                        while (ready < g_chunks) & (polls < MAX_POLLS):
                            ready = tl.atomic_add(ready_ptr + 1 + pid_m, 0, sem="acquire", scope="gpu")
                            polls += 1
                        have_g = ready >= g_chunks
                        # still missing: this tile computes its rows of g itself (the same sums; no progress
                        # then depends on other programs) and notes it in ready_ptr[0]
                        tl.store(ready_ptr, 1, mask=ready < g_chunks)
                        tl.debug_barrier()
                    for r0 in range(0, R, BLOCK_R):
                        if not G_JOBS:
                            lo = lo_desc.load([off_m, r0])
                        elif have_g:
                            # g came from other programs' generic stores: plain loads, the same proxy
                            rr = r0 + offs_r
                            lo = tl.load(lo_ptr + rows[:, None] * stride_lom + rr[None, :],
                                         mask=m_mask[:, None] & (rr < R)[None, :], other=0.0)
                        else:
                            rr = r0 + offs_r
                            lo = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                            for ki in range(k_tiles):
                                ks = ki * BLOCK_K + offs_kk
                                gb = tl.load(gb_ptr + ks.to(tl.int64)[:, None] * stride_gb + rr[None, :],
                                             mask=(ks < K)[:, None] & (rr < R)[None, :], other=0.0)
                                lo = tl.dot(a_desc.load([off_m, ki * BLOCK_K]), gb, lo)
                            lo = lo * g_scale
                        if B_KMAJOR:
                            up = up_desc.load([off_n, r0])
                            acc = tl.dot((lo * lo_scale).to(dt), up.T, acc)
                        else:
                            up = up_desc.load([r0, off_n])
                            acc = tl.dot((lo * lo_scale).to(dt), up, acc)

            if HAS_BIAS:
                bias = tl.load(bias_ptr + cols * stride_bias, mask=n_mask, other=0.0)
                acc += bias.to(tl.float32)[None, :]

            if HAS_STITCH:
                # stride_ids is 0 when one id serves every row
                ids = tl.load(ids_ptr + rows * stride_ids, mask=m_mask, other=-1)
                valid = (ids >= 0) & (ids < S)
                bad = m_mask & ((ids < -1) | (ids >= S))
                # one store per bad row, all of the same value: no atomics needed
                tl.store(flag_ptr + offs_m * 0, tl.zeros((BLOCK_M,), tl.int32), mask=bad & (pid_n == 0))
                safe = tl.where(valid, ids, 0)
                sb = tl.load(sb_ptr + safe[:, None] * stride_sbs + cols[None, :] * stride_sbn,
                             mask=valid[:, None] & n_mask[None, :], other=0.0)
                acc += sb.to(tl.float32)

            out_desc.store([off_m, off_n], acc.to(out_ptr.dtype.element_ty))


# Tuple fields: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, WARP_SPECIALIZE, FLATTEN.
# Only configurations that compile for sm_90 without spilling on triton 3.6 and 3.8 are listed (python -m
# esta_kernels.inspect --all-configs; tests/kernels/test_triton_compile.py keeps it true). The first entry of each
# list is what runs without autotuning and what the static report shows.
MAIN_CONFIGS = [
    (128, 256, 64, 8, 8, 3, False, True),
    (128, 128, 64, 8, 8, 4, False, True),
    (128, 128, 64, 8, 4, 4, True, False),
    (64, 128, 64, 8, 4, 4, False, True),
]
# A float32 stitch bias gathered beside the accumulator: at most 64 accumulator registers per thread.
HEAVY_EPILOGUE_ACC_REGS = 64
# Thin GEMMs (N = the rank, BLOCK_N set by the launcher to the padded rank, at most 256). Fields: BLOCK_M,
# BLOCK_K, num_warps, num_stages; the wide list is for a padded rank above 64.
THIN_CONFIGS = {
    "narrow": [(128, 64, 4, 4), (64, 128, 4, 4)],
    "wide": [(64, 64, 4, 3), (64, 32, 4, 4)],  # a float32 64 x 256 output tile is staged in 64 KB
}


def main_configs(heavy: bool = False, fused: bool = False, g_jobs: bool = False):
    """The Hopper main kernel's configs; `heavy`: a float32 stitch-bias tile in the epilogue; `fused`: the
    fused-xa variant, whose pointer loads in the main loop rule warp specialization out (triton cannot
    partition them) and whose extra A tiles and accumulator overflow shared memory and registers with
    128 x 256 tiles; `g_jobs`: the backward's dx with its g jobs, two kinds of tile under one runtime
    branch: neither warp-specialized nor flattened (both need one loop nest per tile)."""
    rows = MAIN_CONFIGS
    if g_jobs:
        rows = [c[:6] + (False, False) for c in rows if not c[6]]
    if fused:  # and one stage fewer for 128-row tiles: the A tiles (float32 masters) take the room
        rows = [c[:5] + (min(c[5], 3) if c[0] == 128 else c[5],) + c[6:] for c in rows if not c[6] and c[1] <= 128]
    if heavy:
        rows = [c for c in rows if c[0] * c[1] <= HEAVY_EPILOGUE_ACC_REGS * 32 * c[4]]
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, WARP_SPECIALIZE=ws, FLATTEN=fl),
                      num_warps=w, num_stages=s)
        for bm, bn, bk, gm, w, s, ws, fl in rows
    ]


def thin_configs(width: str):
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk, GROUP_M=1, WARP_SPECIALIZE=False, FLATTEN=True),
                      num_warps=w, num_stages=s)
        for bm, bk, w, s in THIN_CONFIGS[width]
    ]
