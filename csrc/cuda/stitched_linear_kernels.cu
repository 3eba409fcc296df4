// CUDA kernels of the stitched linear: a tensor-core GEMM with the LoRA product fused into its reduction and
// the bias and stitch-bias gather fused into its epilogue, a float32 SIMT GEMM with the same interface, and
// deterministic row reductions for the backward. Design notes: csrc/cuda/README.md.
#include "stitched_linear_kernels.cuh"

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <c10/cuda/CUDAException.h>

// WMMA on bfloat16 and cp.async need sm_80; older targets compile empty kernels (the host refuses them).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ESTA_SM80 1
#else
#define ESTA_SM80 0
#endif

namespace esta_cuda {
namespace {

// ------------------------------------------------------------------------------------------- elements
// torch compiles with __CUDA_NO_HALF_CONVERSIONS__ and friends, so every conversion is spelled out.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Parameters that may be float32 masters or the operand dtype are read through a runtime switch (uniform
// across the grid) rather than more template instantiations.
__device__ __forceinline__ float load_as_float(const void* p, Dtype dtype, int64_t i) {
  switch (dtype) {
    case Dtype::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case Dtype::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// The stitch-bias row of output row m, or -1 for none. An id outside [0, S) selects nothing, so the
// kernels never form an address from it (the host reports such ids as errors before launching).
__device__ __forceinline__ int64_t row_stitch(const GemmArgs& p, int64_t m) {
  if (p.stitch_bias == nullptr || p.ids == nullptr) return -1;
  const int64_t s = p.ids[m * p.ids_stride];
  return (s >= 0 && s < p.num_stitches) ? s : -1;
}

template <typename T>
__device__ __forceinline__ void epilogue_store(const GemmArgs& p, int64_t m, int64_t n, float acc) {
  float v = p.alpha * acc;
  if (p.bias != nullptr) v += to_float(static_cast<const T*>(p.bias)[n]);
  const int64_t s = row_stitch(p, m);
  if (s >= 0) v += load_as_float(p.stitch_bias, p.stitch_dtype, s * p.ld_stitch + n);
  if (p.out != nullptr) {
    if (p.out_f32) {
      static_cast<float*>(p.out)[m * p.ldo + n] = v;
    } else {
      static_cast<T*>(p.out)[m * p.ldo + n] = from_float<T>(v);
    }
  }
  if (p.out2 != nullptr) static_cast<T*>(p.out2)[m * p.ldo2 + n] = from_float<T>(p.alpha2 * v);
}

// ------------------------------------------------------------------------------------------- cp.async
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#if ESTA_SM80
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  // src_bytes < 16 zero-fills the rest of the 16 bytes: the tails of rows and columns come for free.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if ESTA_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if ESTA_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

__device__ __forceinline__ bool rows_16b_aligned(const void* p, int64_t ld) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && (ld % 8 == 0);
}

// Copies the R x C tile at (r0, c0) of a row-major (rows, cols) matrix of 16-bit elements into shared memory
// (row stride lds), zero-filling whatever lies outside the matrix. 16-byte cp.async when every row starts
// 16-byte aligned, else element by element (a strided or offset view still works, only slower).
template <int R, int C, int kThreads>
__device__ __forceinline__ void load_tile(uint16_t* dst, int lds, const uint16_t* src, int64_t ld, int64_t r0,
                                          int64_t c0, int64_t rows, int64_t cols, bool vec) {
  constexpr int kChunks = C / 8;
  for (int i = threadIdx.x; i < R * kChunks; i += kThreads) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const int64_t gr = r0 + r, gc = c0 + c;
    uint16_t* d = dst + r * lds + c;
    if (vec) {
      int64_t valid = gr < rows ? cols - gc : 0;
      valid = valid < 0 ? 0 : (valid > 8 ? 8 : valid);
      cp_async_16(d, valid > 0 ? src + gr * ld + gc : src, static_cast<int>(valid) * 2);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) d[e] = (gr < rows && gc + e < cols) ? src[gr * ld + gc + e] : uint16_t(0);
    }
  }
}

// ------------------------------------------------------------------------------ tensor-core GEMM (WMMA)
// Block tile 128 x 128 x 32, 8 warps as 2 x 4, each warp 64 x 32 = 4 x 2 fragments of 16 x 16 (float
// accumulators). Two shared-memory stages: cp.async fills stage k+1 while the warps multiply stage k.
constexpr int kBM = 128, kBN = 128, kBK = 32, kPad = 8, kThreads = 256;
constexpr int kWarpM = 64, kWarpN = 32;
constexpr int kWarpsN = kBN / kWarpN;
constexpr int kFragM = kWarpM / 16, kFragN = kWarpN / 16;
static_assert((kBM / kWarpM) * kWarpsN * 32 == kThreads, "warp grid must cover the block tile");

template <BLayout L>
struct TileShape {
  static constexpr int kLdA = kBK + kPad;  // padded rows keep fragment loads off a single bank
  static constexpr int kLdB = L == BLayout::kNK ? kBK + kPad : kBN + kPad;
  static constexpr int kAStage = kBM * kLdA;
  static constexpr int kBStage = (L == BLayout::kNK ? kBN : kBK) * kLdB;
  static constexpr int kSmemElems = 2 * (kAStage + kBStage);
  // the epilogue reuses the stages as one 16 x 16 float scratch per warp
  static_assert(kSmemElems * 2 >= (kThreads / 32) * 256 * 4, "epilogue scratch must fit in the stages");
  static_assert(kSmemElems * 2 <= 48 * 1024, "static shared memory is limited to 48 KiB");
};

template <typename T, BLayout L>
__global__ void __launch_bounds__(kThreads) wmma_gemm_kernel(const GemmArgs p) {
#if ESTA_SM80
  namespace wmma = nvcuda::wmma;
  using Shape = TileShape<L>;
  using BMajor = std::conditional_t<L == BLayout::kNK, wmma::col_major, wmma::row_major>;
  __shared__ __align__(128) uint16_t smem[Shape::kSmemElems];
  uint16_t* const s_a = smem;
  uint16_t* const s_b = smem + 2 * Shape::kAStage;

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;

  // K tiles of segment 0, then of segment 1; each segment starts on a tile boundary and is zero-padded.
  const int64_t kt0 = (p.k[0] + kBK - 1) / kBK;
  const int64_t kt_total = kt0 + (p.k[1] + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int64_t kt) {
    const int s = kt < kt0 ? 0 : 1;
    const int64_t kk = (s == 0 ? kt : kt - kt0) * kBK;
    const auto* a = static_cast<const uint16_t*>(p.a[s]);
    const auto* b = static_cast<const uint16_t*>(p.b[s]);
    load_tile<kBM, kBK, kThreads>(s_a + stage * Shape::kAStage, Shape::kLdA, a, p.lda[s], m0, kk, p.M, p.k[s],
                                  rows_16b_aligned(a, p.lda[s]));
    if constexpr (L == BLayout::kNK) {
      load_tile<kBN, kBK, kThreads>(s_b + stage * Shape::kBStage, Shape::kLdB, b, p.ldb[s], n0, kk, p.N, p.k[s],
                                    rows_16b_aligned(b, p.ldb[s]));
    } else {
      load_tile<kBK, kBN, kThreads>(s_b + stage * Shape::kBStage, Shape::kLdB, b, p.ldb[s], kk, n0, p.k[s], p.N,
                                    rows_16b_aligned(b, p.ldb[s]));
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragM][kFragN];
#pragma unroll
  for (int i = 0; i < kFragM; ++i)
#pragma unroll
    for (int j = 0; j < kFragN; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  if (kt_total > 0) {
    load_stage(0, 0);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < kt_total; ++kt) {
    // The stage refilled here was last read in iteration kt - 1, which ended with a barrier.
    if (kt + 1 < kt_total) {
      load_stage(static_cast<int>((kt + 1) & 1), kt + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* a_s = reinterpret_cast<const T*>(s_a + (kt & 1) * Shape::kAStage);
    const T* b_s = reinterpret_cast<const T*>(s_b + (kt & 1) * Shape::kBStage);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[kFragM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BMajor> fb[kFragN];
#pragma unroll
      for (int i = 0; i < kFragM; ++i)
        wmma::load_matrix_sync(fa[i], a_s + (wm * kWarpM + i * 16) * Shape::kLdA + kk, Shape::kLdA);
#pragma unroll
      for (int j = 0; j < kFragN; ++j) {
        if constexpr (L == BLayout::kNK) {
          wmma::load_matrix_sync(fb[j], b_s + (wn * kWarpN + j * 16) * Shape::kLdB + kk, Shape::kLdB);
        } else {
          wmma::load_matrix_sync(fb[j], b_s + kk * Shape::kLdB + wn * kWarpN + j * 16, Shape::kLdB);
        }
      }
#pragma unroll
      for (int i = 0; i < kFragM; ++i)
#pragma unroll
        for (int j = 0; j < kFragN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  // Epilogue: each warp stages one 16 x 16 accumulator at a time in its own scratch, then every lane
  // finishes 8 elements (two rows of 16 consecutive columns per store instruction).
  float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
#pragma unroll
  for (int i = 0; i < kFragM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t mb = m0 + wm * kWarpM + i * 16, nb = n0 + wn * kWarpN + j * 16;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int idx = e * 32 + lane;
        const int64_t m = mb + idx / 16, n = nb + idx % 16;
        if (m < p.M && n < p.N) epilogue_store<T>(p, m, n, scratch[idx]);
      }
      __syncwarp();
    }
  }
#endif
}

// ------------------------------------------------------------------------------- float32 SIMT GEMM
// IEEE float32 FFMA (what torch.matmul does for float32 by default, TF32 off). Block tile 64 x 64 x 16,
// 256 threads of 4 x 4 outputs each, strided by 16 so shared-memory reads broadcast and stores coalesce.
constexpr int kSBM = 64, kSBN = 64, kSBK = 16, kSThreads = 256;

template <BLayout L>
__global__ void __launch_bounds__(kSThreads) simt_gemm_kernel(const GemmArgs p) {
  __shared__ float s_a[kSBK][kSBM + 1];
  __shared__ float s_b[kSBK][kSBN + 1];
  const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kSBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSBN;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int s = 0; s < 2; ++s) {
    const int64_t K = p.k[s];
    const auto* a = static_cast<const float*>(p.a[s]);
    const auto* b = static_cast<const float*>(p.b[s]);
    for (int64_t k0 = 0; k0 < K; k0 += kSBK) {
      for (int e = tid; e < kSBM * kSBK; e += kSThreads) {
        const int r = e / kSBK, c = e % kSBK;
        const int64_t gm = m0 + r, gk = k0 + c;
        s_a[c][r] = (gm < p.M && gk < K) ? a[gm * p.lda[s] + gk] : 0.f;
      }
      if constexpr (L == BLayout::kNK) {
        for (int e = tid; e < kSBN * kSBK; e += kSThreads) {
          const int r = e / kSBK, c = e % kSBK;
          const int64_t gn = n0 + r, gk = k0 + c;
          s_b[c][r] = (gn < p.N && gk < K) ? b[gn * p.ldb[s] + gk] : 0.f;
        }
      } else {
        for (int e = tid; e < kSBN * kSBK; e += kSThreads) {
          const int r = e / kSBN, c = e % kSBN;
          const int64_t gk = k0 + r, gn = n0 + c;
          s_b[r][c] = (gk < K && gn < p.N) ? b[gk * p.ldb[s] + gn] : 0.f;
        }
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kSBK; ++kk) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = s_a[kk][tm + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = s_b[kk][tn + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + tm + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tn + 16 * j;
      if (m < p.M && n < p.N) epilogue_store<float>(p, m, n, acc[i][j]);
    }
  }
}

// ------------------------------------------------------------------------------- row reductions
// Block: 64 columns of P x 32 columns of Q over one chunk of rows, staged 16 rows at a time; 256 threads of
// 4 x 2 outputs. Blocks of the first Q column block also sum P's columns per stitch id in the same pass:
// the thread owning column i keeps a running sum while the id stays the same (ids come in runs: a sequence,
// a sample, or one id for the batch) and adds it to its own workspace slot when the id changes, so no two
// threads ever write one address and the order of additions is fixed.
constexpr int kRI = 64, kRJ = 32, kRRows = 16, kRThreads = 256;
constexpr int64_t kRTargetBlocks = 1024;  // about a full wave on the GPUs we target
constexpr int64_t kRMinRows = 64;

struct RowChunks {
  int64_t rows, count;
};

RowChunks row_chunks(const RowReduceArgs& a) {
  const int64_t tiles = ((a.I + kRI - 1) / kRI) * (a.J > 0 ? (a.J + kRJ - 1) / kRJ : 1);
  const int64_t wanted = (kRTargetBlocks + tiles - 1) / tiles;
  int64_t rows = (a.M + wanted - 1) / wanted;
  rows = rows < kRMinRows ? kRMinRows : rows;
  rows = (rows + kRRows - 1) / kRRows * kRRows;
  return {rows, a.M > 0 ? (a.M + rows - 1) / rows : 0};
}

template <typename T>
__global__ void __launch_bounds__(kRThreads)
    row_reduce_kernel(const RowReduceArgs p, int64_t rows_per_chunk, float* ws_prod, float* ws_stitch) {
  __shared__ float s_p[kRRows][kRI];
  __shared__ float s_q[kRRows][kRJ];
  __shared__ int64_t s_id[kRRows];
  const int tid = threadIdx.x, ti = tid % 16, tj = tid / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kRI;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kRJ;
  const int64_t chunk = blockIdx.z;
  const int64_t row_begin = chunk * rows_per_chunk;
  const int64_t row_end = row_begin + rows_per_chunk < p.M ? row_begin + rows_per_chunk : p.M;
  const bool do_prod = p.q != nullptr && p.J > 0;
  const bool do_stitch = p.ids != nullptr && blockIdx.y == 0;
  const bool owner = do_stitch && tid < kRI && i0 + tid < p.I;
  const auto* P = static_cast<const T*>(p.p);

  float* stitch_col = owner ? ws_stitch + chunk * p.num_stitches * p.I + i0 + tid : nullptr;
  if (owner)
    for (int64_t s = 0; s < p.num_stitches; ++s) stitch_col[s * p.I] = 0.f;
  int64_t cur = -1;
  float run = 0.f;
  auto flush = [&]() {
    if (cur >= 0 && cur < p.num_stitches) stitch_col[cur * p.I] += run;
  };

  float acc[4][2];
#pragma unroll
  for (int a = 0; a < 4; ++a) acc[a][0] = acc[a][1] = 0.f;

  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRRows) {
    for (int e = tid; e < kRRows * kRI; e += kRThreads) {
      const int r = e / kRI, c = e % kRI;
      const int64_t gm = r0 + r, gi = i0 + c;
      s_p[r][c] = (gm < row_end && gi < p.I) ? to_float(P[gm * p.ldp + gi]) : 0.f;
    }
    if (do_prod) {
      for (int e = tid; e < kRRows * kRJ; e += kRThreads) {
        const int r = e / kRJ, c = e % kRJ;
        const int64_t gm = r0 + r, gj = j0 + c;
        s_q[r][c] = (gm < row_end && gj < p.J) ? p.q[gm * p.ldq + gj] : 0.f;
      }
    }
    if (do_stitch && tid < kRRows) {
      const int64_t gm = r0 + tid;
      s_id[tid] = gm < row_end ? p.ids[gm * p.ids_stride] : -1;
    }
    __syncthreads();
    if (do_prod) {
#pragma unroll
      for (int r = 0; r < kRRows; ++r) {
        float pv[4], qv[2];
#pragma unroll
        for (int a = 0; a < 4; ++a) pv[a] = s_p[r][ti + 16 * a];
        qv[0] = s_q[r][tj];
        qv[1] = s_q[r][tj + 16];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          acc[a][0] = fmaf(pv[a], qv[0], acc[a][0]);
          acc[a][1] = fmaf(pv[a], qv[1], acc[a][1]);
        }
      }
    }
    if (owner) {
      for (int r = 0; r < kRRows; ++r) {
        const int64_t s = s_id[r];
        if (s != cur) {
          flush();
          cur = s;
          run = 0.f;
        }
        run += s_p[r][tid];
      }
    }
    __syncthreads();
  }
  if (owner) flush();
  if (do_prod) {
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int64_t i = i0 + ti + 16 * a, j = j0 + tj + 16 * b;
        if (i < p.I && j < p.J) ws_prod[(chunk * p.I + i) * p.J + j] = acc[a][b];
      }
    }
  }
}

// out[i, j] (or out[j, i]) = alpha * the sum over chunks, in chunk order, of ws[chunk, i, j].
__global__ void sum_chunks_kernel(const float* ws, int64_t chunks, int64_t I, int64_t J, float alpha, float* out,
                                  bool transpose_out) {
  const int64_t total = I * J;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t c = 0; c < chunks; ++c) s += ws[c * total + idx];
    const int64_t i = idx / J, j = idx % J;
    out[transpose_out ? j * I + i : idx] = alpha * s;
  }
}

void launch_sum_chunks(const float* ws, int64_t chunks, int64_t I, int64_t J, float alpha, float* out,
                       bool transpose_out, cudaStream_t stream) {
  const int64_t total = I * J;
  if (total == 0) return;
  const int64_t blocks = (total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096;
  sum_chunks_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(ws, chunks, I, J, alpha, out, transpose_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_wmma_gemm(BLayout layout, const GemmArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((args.M + kBM - 1) / kBM), static_cast<unsigned>((args.N + kBN - 1) / kBN));
  if (layout == BLayout::kNK) {
    wmma_gemm_kernel<T, BLayout::kNK><<<grid, kThreads, 0, stream>>>(args);
  } else {
    wmma_gemm_kernel<T, BLayout::kKN><<<grid, kThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_simt_gemm(BLayout layout, const GemmArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((args.M + kSBM - 1) / kSBM),
                  static_cast<unsigned>((args.N + kSBN - 1) / kSBN));
  if (layout == BLayout::kNK) {
    simt_gemm_kernel<BLayout::kNK><<<grid, kSThreads, 0, stream>>>(args);
  } else {
    simt_gemm_kernel<BLayout::kKN><<<grid, kSThreads, 0, stream>>>(args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_gemm(Dtype dtype, BLayout layout, const GemmArgs& args, cudaStream_t stream) {
  if (args.M == 0 || args.N == 0) return;
  TORCH_CHECK(args.M <= int64_t(kSBM) * 0x7fffffff && (args.N + kSBN - 1) / kSBN <= 65535,
              "esta cuda backend: GEMM of ", args.M, " x ", args.N, " exceeds the launch grid");
  switch (dtype) {
    case Dtype::kFloat16:
      launch_wmma_gemm<__half>(layout, args, stream);
      break;
    case Dtype::kBFloat16:
      launch_wmma_gemm<__nv_bfloat16>(layout, args, stream);
      break;
    case Dtype::kFloat32:
      launch_simt_gemm(layout, args, stream);
      break;
  }
}

int64_t row_reduce_workspace_floats(const RowReduceArgs& args) {
  const RowChunks ch = row_chunks(args);
  const bool prod = args.q != nullptr && args.J > 0;
  return ch.count * ((prod ? args.I * args.J : 0) + (args.ids != nullptr ? args.num_stitches * args.I : 0));
}

void launch_row_reduce(Dtype dtype, const RowReduceArgs& args, float* workspace, cudaStream_t stream) {
  if (args.M == 0 || args.I == 0) return;  // the host zero-fills outputs of empty reductions
  const RowChunks ch = row_chunks(args);
  const bool prod = args.q != nullptr && args.J > 0;
  float* ws_prod = workspace;
  float* ws_stitch = workspace + (prod ? ch.count * args.I * args.J : 0);
  const dim3 grid(static_cast<unsigned>((args.I + kRI - 1) / kRI),
                  static_cast<unsigned>(prod ? (args.J + kRJ - 1) / kRJ : 1), static_cast<unsigned>(ch.count));
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "esta cuda backend: reduction of ", args.I, " x ", args.J,
              " exceeds the launch grid");
  switch (dtype) {
    case Dtype::kFloat16:
      row_reduce_kernel<__half><<<grid, kRThreads, 0, stream>>>(args, ch.rows, ws_prod, ws_stitch);
      break;
    case Dtype::kBFloat16:
      row_reduce_kernel<__nv_bfloat16><<<grid, kRThreads, 0, stream>>>(args, ch.rows, ws_prod, ws_stitch);
      break;
    case Dtype::kFloat32:
      row_reduce_kernel<float><<<grid, kRThreads, 0, stream>>>(args, ch.rows, ws_prod, ws_stitch);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (prod) launch_sum_chunks(ws_prod, ch.count, args.I, args.J, args.alpha, args.out, args.transpose_out, stream);
  if (args.ids != nullptr) {
    launch_sum_chunks(ws_stitch, ch.count, args.num_stitches, args.I, 1.f, args.stitch_out, false, stream);
  }
}

}  // namespace esta_cuda
