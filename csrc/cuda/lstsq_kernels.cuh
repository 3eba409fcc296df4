// Launcher of the CUDA kernel of the least-squares accumulation (esta::lstsq_accumulate), callable from
// plain C++ (csrc/cuda/lstsq_cuda.cpp). Like stitched_linear_kernels.cuh, this header names no ATen type, so
// the kernels' translation unit includes only CUDA headers and c10's launch check.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace esta_cuda {

// Element type of both activations (the host converts a mixed pair to a common type first).
enum class LstsqDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// With u = h_in - shift_in[b], v = h_out - shift_out[b] for the rows of block b (rows [1024 b, 1024 (b + 1))),
// ua = [u, 1] and c = [u | 1 | v] (width D = d_in + 1 + d_out):
//   partials[s, i, j] = sum over the rows m of split s of ua[m, i] * c[m, j]
// so that the sum over s holds gram = ua.T @ ua in its first d_in + 1 columns and cross = ua.T @ v in the
// rest. Only tiles on or above the gram diagonal are written: entries of the gram part below the diagonal
// may be left unwritten (the host mirrors the upper triangle). u and v are float32 (a float64 input has
// its shift subtracted in float64 first); the products of each block of at most 1024 rows are summed in
// float32 and the block sums in float64.
struct LstsqArgs {
  int64_t n = 0, d_in = 0, d_out = 0;
  const void* h_in = nullptr;  // (n, d_in), element (m, k) at m * in_stride_m + k * in_stride_k
  int64_t in_stride_m = 0, in_stride_k = 0;
  const void* h_out = nullptr;  // (n, d_out)
  int64_t out_stride_m = 0, out_stride_k = 0;
  const void* shift_in = nullptr;  // (blocks, d_in) contiguous, row b at b * shift_in_stride_b (0: one
                                   // shift for every row): float32, or float64 for float64 inputs
  const void* shift_out = nullptr;  // (blocks, d_out) likewise
  int64_t shift_in_stride_b = 0, shift_out_stride_b = 0;
  double* partials = nullptr;  // (splits, d_in + 1, D) contiguous
  int64_t rows_per_split = 0;  // a multiple of 1024
  int64_t splits = 0;
};

// (rows per split, splits) for n rows: enough blocks for a few waves on num_sms multiprocessors.
void lstsq_row_splits(int64_t n, int64_t d_in, int64_t d_out, int num_sms, int64_t* rows_per_split,
                      int64_t* splits);

void launch_lstsq_accumulate(LstsqDtype dtype, const LstsqArgs& args, cudaStream_t stream);

}  // namespace esta_cuda
