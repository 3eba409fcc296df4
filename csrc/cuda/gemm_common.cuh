// Device helpers shared by the GEMM kernels of the stitched linear (SIMT, Ampere-class and Hopper): element
// conversions, the bias and stitch-bias gather of the epilogue, and the host-side launch declarations of
// each kernel family. CUDA headers only (no ATen); CUTLASS types stay in the kernel files.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "stitched_linear_kernels.cuh"

namespace esta_cuda {

// ------------------------------------------------------------------------------------------- elements
// torch compiles with __CUDA_NO_HALF_CONVERSIONS__ and friends, so every conversion is spelled out; 16-bit
// values are read as raw bits through the read-only cache.
__device__ __forceinline__ float load_as_float(const void* p, Dtype dtype, int64_t i) {
  switch (dtype) {
    case Dtype::kFloat16:
      return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(p) + i)));
    case Dtype::kBFloat16:
      return __bfloat162float(__ushort_as_bfloat16(__ldg(static_cast<const unsigned short*>(p) + i)));
    default:
      return __ldg(static_cast<const float*>(p) + i);
  }
}

template <Dtype D>
__device__ __forceinline__ void store_from_float(void* p, int64_t i, float v) {
  if constexpr (D == Dtype::kFloat16) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else if constexpr (D == Dtype::kBFloat16) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// ------------------------------------------------------------------------------------------ stitch ids
// Records an id outside [-1, S) in the device's error slot (launch_check_ids turns it into an assertion).
// Threads that meet different bad ids race; whichever pair lands is a true one.
__device__ __forceinline__ void report_bad_id(long long* slot, int64_t id, int64_t num_stitches) {
  if (slot != nullptr) {
    slot[0] = static_cast<long long>(id);
    slot[1] = static_cast<long long>(num_stitches);
  }
}

// stitch_bias[ids[m], n] for an id in [0, S), else 0: an id outside [0, S) never forms an address.
__device__ __forceinline__ float stitch_bias_at(const void* stitch_bias, Dtype dtype, int64_t ld, int64_t num_stitches,
                                                const int64_t* ids, int64_t ids_stride, long long* id_error,
                                                int64_t m, int64_t n) {
  if (ids == nullptr) return 0.f;
  const int64_t s = __ldg(reinterpret_cast<const long long*>(ids) + m * ids_stride);
  if (s >= 0 && s < num_stitches) return load_as_float(stitch_bias, dtype, s * ld + n);
  if (s != -1) report_bad_id(id_error, s, num_stitches);
  return 0.f;
}

// The epilogue of GemmArgs for one element (m, n) of split `split` (SIMT and Ampere-class kernels; the
// Hopper kernel computes the same in its epilogue visitor).
template <Dtype D>
__device__ __forceinline__ void epilogue_store(const GemmArgs& p, int64_t m, int64_t n, float acc, int64_t split) {
  float v = p.alpha * acc;
  if (p.bias != nullptr) v += load_as_float(p.bias, D, n);
  v += stitch_bias_at(p.stitch_bias, p.stitch_dtype, p.ld_stitch, p.num_stitches, p.ids, p.ids_stride, p.id_error,
                      m, n);
  if (p.out != nullptr && n < p.out_n) {
    const int64_t i = split * p.split_stride + m * p.ldo + n;
    if (p.out_f32) {
      store_from_float<Dtype::kFloat32>(p.out, i, v);
    } else {
      store_from_float<D>(p.out, i, v);
    }
  }
  if (p.out2 != nullptr) store_from_float<D>(p.out2, m * p.ldo2 + n, p.alpha2 * v);
}

// The reduction range of split z (GemmArgs::k_chunk) of segment 0: [k_begin, k_end).
__device__ __forceinline__ void split_range(const GemmArgs& p, int64_t z, int64_t& k_begin, int64_t& k_end) {
  if (p.k_chunk <= 0) {
    k_begin = 0;
    k_end = p.k[0];
    return;
  }
  k_begin = z * p.k_chunk;
  k_end = k_begin + p.k_chunk < p.k[0] ? k_begin + p.k_chunk : p.k[0];
}

namespace detail {

// Kernel families, each launched on arguments the dispatcher (gemm_dispatch.cu) has checked.
void launch_simt(Dtype dtype, const GemmArgs& args, cudaStream_t stream);
// Ampere-class tensor cores (cp.async + mma.sync), 16-bit operands, 16-byte aligned (gemm_sm80_*.cu).
template <Dtype D, Major MA, Major MB>
void launch_sm80(const GemmArgs& args, cudaStream_t stream);
// Hopper TMA + wgmma, warp-specialized (gemm_sm90_*.cu): the forward (both operands K-major, bias and
// stitch-bias epilogue) and dx (B MN-major, plain epilogue), 16-bit output, one split, alpha 1.
template <Dtype D>
void launch_sm90_forward(const GemmArgs& args, cudaStream_t stream);
template <Dtype D>
void launch_sm90_dgrad(const GemmArgs& args, cudaStream_t stream);

}  // namespace detail
}  // namespace esta_cuda
