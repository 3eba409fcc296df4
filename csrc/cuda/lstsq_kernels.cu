// CUDA kernel of the least-squares accumulation: a SIMT (FFMA) kernel over 64 x 64 output tiles of
// ua.T @ [u | 1 | v], with u, the ones column and v built while staging shared-memory tiles. One pass over
// the activations; no atomics (each block writes its own float64 partial), so results are reproducible.
#include "lstsq_kernels.cuh"

#include <algorithm>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/cuda/CUDAException.h>

namespace esta_cuda {
namespace {

constexpr int kTile = 64;        // output tile (i and j)
constexpr int kRows = 16;        // rows staged per step
constexpr int kThreads = 256;    // 16 x 16 threads, 4 x 4 outputs each
constexpr int kRowBlock = 1024;  // rows per float32 block sum (the contract's precision unit)
static_assert(kRowBlock % kRows == 0, "a row block is a whole number of steps");

// torch compiles with __CUDA_NO_HALF_CONVERSIONS__ and friends, so every conversion is spelled out. A float64
// input subtracts its (float64) shift before rounding to float32.
template <typename T>
struct ShiftOf {
  using type = float;
};
template <>
struct ShiftOf<double> {
  using type = double;
};
__device__ __forceinline__ float centred(float x, float s) { return x - s; }
__device__ __forceinline__ float centred(__half x, float s) { return __half2float(x) - s; }
__device__ __forceinline__ float centred(__nv_bfloat16 x, float s) { return __bfloat162float(x) - s; }
__device__ __forceinline__ float centred(double x, double s) { return static_cast<float>(x - s); }

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) lstsq_accumulate_kernel(const LstsqArgs p) {
  using S = typename ShiftOf<T>::type;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  // Every column of this tile is below every row: it mirrors a tile above the diagonal.
  if (j0 + kTile <= i0) return;
  const int64_t d_in = p.d_in, D = p.d_in + 1 + p.d_out;
  const T* h_in = static_cast<const T*>(p.h_in);
  const T* h_out = static_cast<const T*>(p.h_out);

  __shared__ float sa[kRows][kTile];  // ua[m, i0 + c]
  __shared__ float sb[kRows][kTile];  // c[m, j0 + c] = [u | 1 | v]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4];
  double acc64[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      acc[a][b] = 0.f;
      acc64[a][b] = 0.0;
    }
  }

  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * p.rows_per_split;
  const int64_t m_end = std::min(p.n, m_begin + p.rows_per_split);
  for (int64_t b0 = m_begin; b0 < m_end; b0 += kRowBlock) {
    const int64_t b_end = std::min(m_end, b0 + kRowBlock);
    // splits are whole row blocks, so b0 starts a block: its own shift row
    const S* shift_in = static_cast<const S*>(p.shift_in) + (b0 / kRowBlock) * p.shift_in_stride_b;
    const S* shift_out = static_cast<const S*>(p.shift_out) + (b0 / kRowBlock) * p.shift_out_stride_b;
    for (int64_t m0 = b0; m0 < b_end; m0 += kRows) {
      // Consecutive threads take consecutive columns of one row: coalesced for row-major activations.
#pragma unroll
      for (int e = threadIdx.x; e < kRows * kTile; e += kThreads) {
        const int r = e / kTile, c = e % kTile;
        const int64_t m = m0 + r;
        float av = 0.f, bv = 0.f;  // rows past the block and columns past the edge add nothing
        if (m < b_end) {
          const int64_t i = i0 + c, j = j0 + c;
          if (i < d_in) {
            av = centred(h_in[m * p.in_stride_m + i * p.in_stride_k], shift_in[i]);
          } else if (i == d_in) {
            av = 1.f;
          }
          if (j < d_in) {
            bv = centred(h_in[m * p.in_stride_m + j * p.in_stride_k], shift_in[j]);
          } else if (j == d_in) {
            bv = 1.f;
          } else if (j < D) {
            const int64_t k = j - d_in - 1;
            bv = centred(h_out[m * p.out_stride_m + k * p.out_stride_k], shift_out[k]);
          }
        }
        sa[r][c] = av;
        sb[r][c] = bv;
      }
      __syncthreads();
      // Strided ownership (rows ty + 16a, columns tx + 16b): a warp reads 2 distinct sa words (broadcast)
      // and 16 consecutive sb words per step, free of bank conflicts.
#pragma unroll
      for (int k = 0; k < kRows; ++k) {
        float x[4], y[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) x[a] = sa[k][ty + 16 * a];
#pragma unroll
        for (int b = 0; b < 4; ++b) y[b] = sb[k][tx + 16 * b];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
#pragma unroll
          for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(x[a], y[b], acc[a][b]);
        }
      }
      __syncthreads();
    }
    // End of a row block: its float32 sums join the float64 ones.
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        acc64[a][b] += static_cast<double>(acc[a][b]);
        acc[a][b] = 0.f;
      }
    }
  }

  double* out = p.partials + static_cast<int64_t>(blockIdx.z) * (d_in + 1) * D;
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t i = i0 + ty + 16 * a;
    if (i > d_in) continue;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t j = j0 + tx + 16 * b;
      if (j < D) out[i * D + j] = acc64[a][b];
    }
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
void launch_typed(const LstsqArgs& p, cudaStream_t stream) {
  const int64_t tiles_i = cdiv(p.d_in + 1, kTile), tiles_j = cdiv(p.d_in + 1 + p.d_out, kTile);
  const dim3 grid(static_cast<unsigned>(tiles_j), static_cast<unsigned>(tiles_i), static_cast<unsigned>(p.splits));
  lstsq_accumulate_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void lstsq_row_splits(int64_t n, int64_t d_in, int64_t d_out, int num_sms, int64_t* rows_per_split,
                      int64_t* splits) {
  const int64_t ti = cdiv(d_in + 1, kTile), tj = cdiv(d_in + 1 + d_out, kTile);
  const int64_t tiles = std::max<int64_t>(ti * tj - ti * (ti - 1) / 2, 1);  // on or above the diagonal
  // about two waves (two blocks of 256 threads fit on a multiprocessor), each split whole row blocks
  int64_t want = std::min(cdiv(4 * static_cast<int64_t>(std::max(num_sms, 1)), tiles), cdiv(n, kRowBlock));
  want = std::max<int64_t>(want, 1);
  *rows_per_split = cdiv(cdiv(n, want), kRowBlock) * kRowBlock;
  *splits = cdiv(n, *rows_per_split);
}

void launch_lstsq_accumulate(LstsqDtype dtype, const LstsqArgs& args, cudaStream_t stream) {
  if (args.n == 0 || args.splits == 0) return;
  switch (dtype) {
    case LstsqDtype::kFloat16:
      launch_typed<__half>(args, stream);
      break;
    case LstsqDtype::kBFloat16:
      launch_typed<__nv_bfloat16>(args, stream);
      break;
    case LstsqDtype::kFloat64:
      launch_typed<double>(args, stream);
      break;
    default:
      launch_typed<float>(args, stream);
      break;
  }
}

}  // namespace esta_cuda
