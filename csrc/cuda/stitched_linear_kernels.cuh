// Launchers of the CUDA kernels of the stitched linear, callable from plain C++
// (csrc/cuda/stitched_linear_cuda.cpp). This header names no ATen and no CUTLASS type: the kernels'
// translation units include CUDA, CUTLASS/CuTe and c10's launch check only, and the ATen host code is
// compiled once by the C++ compiler. Every launcher checks each of its launches (C10_CUDA_KERNEL_LAUNCH_CHECK,
// which throws c10::Error). Design: csrc/cuda/README.md.
#pragma once

#include <array>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace esta_cuda {

// Element types the kernels read and write.
enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How an operand of C (M, N) = A (M, K) . B (N, K)^T is stored; i is its row (m for A, n for B), k the
// reduction index, ld its leading dimension in elements:
//   kK:  element (i, k) at p[i * ld + k]   (rows of a row-major matrix: x and weight in the forward)
//   kMN: element (i, k) at p[k * ld + i]   (columns of a row-major matrix: weight in dx = dy . weight)
enum class Major : int { kK = 0, kMN = 1 };

// C (M, N) = alpha * sum over segments s of A_s (M, k_s) . B_s (N, k_s)^T, then the epilogue below.
// A second segment appends the rank-r LoRA product to the reduction, so the frozen GEMM and the LoRA
// up-projection share one accumulator: [x | s*xa] . [W | B]^T and [dy | g] . [W ; A]. Both segments store
// A as a_major and B as b_major.
struct GemmArgs {
  int64_t M = 0, N = 0;
  Major a_major = Major::kK, b_major = Major::kK;
  const void* a[2] = {nullptr, nullptr};
  const void* b[2] = {nullptr, nullptr};
  int64_t lda[2] = {0, 0};
  int64_t ldb[2] = {0, 0};
  int64_t k[2] = {0, 0};  // reduction length of each segment; k[1] = 0: no second segment
  // Split of the reduction (the backward's sums over rows), deterministic: split z of gridDim.z reduces
  // k in [z * k_chunk, min(k[0], (z + 1) * k_chunk)) of segment 0 (no second segment then) and writes
  // its own output at out + z * split_stride. k_chunk = 0: one split.
  int64_t k_chunk = 0;
  int64_t split_stride = 0;
  float alpha = 1.f;
  // Epilogue, per element (m, n): v = alpha * acc + bias[n] + stitch_bias[ids[m * ids_stride], n]
  const void* bias = nullptr;  // (N,) in the operand dtype, or null
  const void* stitch_bias = nullptr;  // (S, N) row stride ld_stitch
  Dtype stitch_dtype = Dtype::kFloat32;
  int64_t ld_stitch = 0;
  int64_t num_stitches = 0;
  // ids (null: no stitch bias); ids_stride 0 gives every row one id. An id outside [0, S) adds nothing
  // and is never used to form an address; one other than -1 is written to id_error (see below).
  const int64_t* ids = nullptr;
  int64_t ids_stride = 0;
  long long* id_error = nullptr;
  // Outputs: out[m, n] = v for n < out_n (float32 or the operand dtype); out2[m, n] = alpha2 * v in the
  // operand dtype, for every n < N.
  void* out = nullptr;
  int64_t ldo = 0;
  int64_t out_n = -1;  // -1: N
  bool out_f32 = false;
  void* out2 = nullptr;
  int64_t ldo2 = 0;
  float alpha2 = 1.f;
};

// Which kernel ran (for tests and the static report): the Hopper TMA/wgmma kernel, the Ampere-class
// tensor-core kernel (mma.sync, also used on Hopper for the skinny and split GEMMs), or the SIMT kernel
// (float32, and 16-bit operands that are not 16-byte aligned).
enum class GemmPath : int { kSm90 = 0, kSm80 = 1, kSimt = 2 };

// Runs the GEMM on the fastest kernel that supports these arguments on the current device.
GemmPath launch_gemm(Dtype dtype, const GemmArgs& args, cudaStream_t stream);

// Launches per GemmPath since the extension was loaded (the GPU tests check which kernels ran).
std::array<int64_t, 3> gemm_path_counts();

// Whether the Hopper kernels were built (TORCH_CUDA_ARCH_LIST had 9.0: sm_90a).
bool built_with_sm90a();

// The device's two-slot stitch-id error record {id, S}: {-1, 0} until a kernel meets an id outside [-1, S)
// and writes it there. A __device__ variable (one per device), so it needs no allocation and works under
// CUDA-graph capture.
long long* id_error_slot();

// Raises a device-side assertion (naming the id and S) if the slot holds an error: no host sync, and it
// is captured into CUDA graphs like any launch. A failed device assertion ends the CUDA context.
void launch_check_ids(const long long* slot, cudaStream_t stream);

// Records any id outside [-1, S) of ids[m * ids_stride], m < count, in the error slot (for the calls whose
// GEMM visits no output element, so no epilogue reads the ids).
void launch_scan_ids(const int64_t* ids, int64_t count, int64_t ids_stride, int64_t num_stitches, long long* slot,
                     cudaStream_t stream);

// The backward's right-hand side of d lora_b and d stitch_bias in one matrix, q (M, ldq) in the operand dtype:
//   q[m, j] = scale * xa[m, j]                      for j < r
//   q[m, r + s] = 1 if ids[m * ids_stride] == s     for s < S (an id outside [0, S) sets no column and, if
//                                                   it is not -1, is written to id_error)
//   q[m, j] = 0                                     for r + S <= j < ldq
struct OnehotArgs {
  int64_t M = 0, r = 0, S = 0, ldq = 0;
  const float* xa = nullptr;  // (M, r) row stride ldxa; may be null when r = 0
  int64_t ldxa = 0;
  float scale = 1.f;
  const int64_t* ids = nullptr;  // may be null when S = 0
  int64_t ids_stride = 0;
  long long* id_error = nullptr;
  void* q = nullptr;
};
void launch_build_lora_onehot(Dtype dtype, const OnehotArgs& args, cudaStream_t stream);

// Adds the split partials of a reduction, in split order (bitwise reproducible), into up to two outputs:
// total[i, j] = sum over z < splits of ws[(z * I + i) * J + j]; columns [0, cols_a) go to out_a and
// [cols_a, cols_a + cols_b) to out_b (column j - cols_a), each float32, written at [i * ld + j] or, when
// transposed, at [j * ld + i].
struct SplitSumArgs {
  const float* ws = nullptr;
  int64_t splits = 0, I = 0, J = 0;
  float* out_a = nullptr;
  int64_t cols_a = 0, ld_a = 0;
  bool transpose_a = false;
  float* out_b = nullptr;
  int64_t cols_b = 0, ld_b = 0;
  bool transpose_b = false;
};
void launch_split_sum(const SplitSumArgs& args, cudaStream_t stream);

}  // namespace esta_cuda
