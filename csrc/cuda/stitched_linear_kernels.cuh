// Launchers of the CUDA kernels of the stitched linear, callable from plain C++
// (csrc/cuda/stitched_linear_cuda.cpp). This header names no ATen type: the kernels' translation unit
// (stitched_linear_kernels.cu) includes only CUDA headers and c10's launch check, which keeps nvcc's
// per-architecture passes short; the ATen host code is compiled once by the C++ compiler. Every launcher
// checks each of its launches (C10_CUDA_KERNEL_LAUNCH_CHECK, which throws c10::Error).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace esta_cuda {

// Element types the kernels read and write.
enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How the B operand of a GEMM C = A @ op(B) is stored (both row-major in memory):
//   kNK: B is (N, K), C = A @ B.T   (x @ weight.T in the forward)
//   kKN: B is (K, N), C = A @ B     (dy @ weight in the backward)
enum class BLayout : int { kNK = 0, kKN = 1 };

// C (M, N) = alpha * sum over segments s of A_s @ op(B_s), followed by the epilogue below.
// A second segment appends the rank-r LoRA product to the reduction dimension, so the main GEMM and the
// LoRA up-projection share one accumulator: [x | xa] @ [W | B].T, [dy | g] @ [W ; A].
// Every operand is row-major with unit column stride; lda/ldb are row strides in elements.
struct GemmArgs {
  int64_t M = 0, N = 0;
  const void* a[2] = {nullptr, nullptr};
  const void* b[2] = {nullptr, nullptr};
  int64_t lda[2] = {0, 0};
  int64_t ldb[2] = {0, 0};
  int64_t k[2] = {0, 0};  // reduction length of each segment; k[1] = 0 means no second segment
  float alpha = 1.f;
  // Epilogue, per element (m, n): v = alpha * acc + bias[n] + stitch_bias[ids[m * ids_stride], n]
  const void* bias = nullptr;  // (N,) in the operand dtype, or null
  const void* stitch_bias = nullptr;  // (S, N), or null
  Dtype stitch_dtype = Dtype::kFloat32;
  int64_t ld_stitch = 0;
  int64_t num_stitches = 0;
  const int64_t* ids = nullptr;  // ids outside [0, S) add nothing (and are never used as an address)
  int64_t ids_stride = 0;  // 0 broadcasts one id to every row
  // Outputs: out[m, n] = v (float32 or the operand dtype); out2[m, n] = alpha2 * v in the operand dtype.
  void* out = nullptr;
  int64_t ldo = 0;
  bool out_f32 = false;
  void* out2 = nullptr;
  int64_t ldo2 = 0;
  float alpha2 = 1.f;
};

// A and B in `dtype`; float16/bfloat16 run on tensor cores (WMMA, float accumulation), float32 on a SIMT
// FFMA kernel (IEEE float32, no TF32).
void launch_gemm(Dtype dtype, BLayout layout, const GemmArgs& args, cudaStream_t stream);

// Deterministic reductions over rows for the backward, "TN" products:
//   out[i, j] = alpha * sum_m P[m, i] * Q[m, j]   (or written transposed, out[j, i], when transpose_out)
// P (M, I) in `dtype` with row stride ldp; Q (M, J) float32 with row stride ldq; out float32 contiguous.
// When ids is given, in the same pass over P: stitch_out[s, i] = sum of P[m, i] over the rows m whose id is
// s (ids outside [0, S) contribute nothing); stitch_out (S, I) float32 contiguous.
// Rows are split into chunks whose partial sums go to a float32 workspace and are added in a fixed order,
// so the result is bitwise reproducible for a given shape (the chunking depends on shapes only).
struct RowReduceArgs {
  int64_t M = 0, I = 0, J = 0;
  const void* p = nullptr;
  int64_t ldp = 0;
  const float* q = nullptr;  // null (or J = 0): no product, only the stitch sums
  int64_t ldq = 0;
  float alpha = 1.f;
  float* out = nullptr;
  bool transpose_out = false;
  const int64_t* ids = nullptr;  // null: no stitch sums
  int64_t ids_stride = 0;
  int64_t num_stitches = 0;
  float* stitch_out = nullptr;
};

// Size in floats of the workspace launch_row_reduce needs for these args.
int64_t row_reduce_workspace_floats(const RowReduceArgs& args);
void launch_row_reduce(Dtype dtype, const RowReduceArgs& args, float* workspace, cudaStream_t stream);

}  // namespace esta_cuda
