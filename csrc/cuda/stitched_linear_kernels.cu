// The GEMM dispatcher of the stitched linear (Hopper, Ampere-class or SIMT kernel, by device and operand
// alignment), the SIMT GEMM, and the small kernels of the backward and of the stitch-id check. CUDA and
// c10 headers only; the CUTLASS kernels live in gemm_sm80_*.cu and gemm_sm90_*.cu. Design:
// csrc/cuda/README.md.
#include "stitched_linear_kernels.cuh"

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdio>

#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include "gemm_common.cuh"

namespace esta_cuda {
namespace {

// ------------------------------------------------------------------------------- float32 / SIMT GEMM
// The fallback for float32 (IEEE float32 products and accumulation, no TF32: what torch.matmul does for
// float32 by default) and for 16-bit operands that tensor cores cannot read with 16-byte vectors. Block tile
// 64 x 64 x 16, 256 threads of 4 x 4 outputs, strided by 16 so shared-memory reads broadcast and stores
// coalesce. Any storage of A and B (GemmArgs::Major), splits and both segments.
constexpr int kSBM = 64, kSBN = 64, kSBK = 16, kSThreads = 256;

template <Dtype D>
__global__ void __launch_bounds__(kSThreads) simt_gemm_kernel(const GemmArgs p) {
  __shared__ float s_a[kSBK][kSBM + 1];
  __shared__ float s_b[kSBK][kSBN + 1];
  const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kSBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kSBN;
  const int64_t split = blockIdx.z;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int s = 0; s < 2; ++s) {
    int64_t k_begin = 0, k_end = p.k[1];
    if (s == 0) split_range(p, split, k_begin, k_end);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kSBK) {
      for (int e = tid; e < kSBM * kSBK; e += kSThreads) {
        // consecutive threads walk the operand's contiguous dimension
        const bool k_major = p.a_major == Major::kK;
        const int r = k_major ? e / kSBK : e % kSBM, c = k_major ? e % kSBK : e / kSBM;
        const int64_t gm = m0 + r, gk = k0 + c;
        s_a[c][r] = (gm < p.M && gk < k_end)
                        ? load_as_float(p.a[s], D, k_major ? gm * p.lda[s] + gk : gk * p.lda[s] + gm)
                        : 0.f;
      }
      for (int e = tid; e < kSBN * kSBK; e += kSThreads) {
        const bool k_major = p.b_major == Major::kK;
        const int r = k_major ? e / kSBK : e % kSBN, c = k_major ? e % kSBK : e / kSBN;
        const int64_t gn = n0 + r, gk = k0 + c;
        s_b[c][r] = (gn < p.N && gk < k_end)
                        ? load_as_float(p.b[s], D, k_major ? gn * p.ldb[s] + gk : gk * p.ldb[s] + gn)
                        : 0.f;
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
      if (m < p.M && n < p.N) epilogue_store<D>(p, m, n, acc[i][j], split);
    }
  }
}

// ------------------------------------------------------------------------------------ stitch-id slot
__device__ long long g_stitch_id_error[2] = {-1, 0};

__global__ void check_ids_kernel(const long long* slot) {
  const long long id = slot[0];
  if (id != -1) {
    printf("esta::stitched_linear: stitch id %lld is outside [-1, %lld) (S = %lld stitch-bias rows)\n", id, slot[1],
           slot[1]);
    CUDA_KERNEL_ASSERT(false && "esta::stitched_linear: a stitch id is outside [-1, S)");
  }
}

// --------------------------------------------------------------------------------- backward helpers
template <Dtype D>
__global__ void lora_onehot_kernel(const OnehotArgs a) {
  const int64_t total = a.M * a.ldq;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = idx / a.ldq, j = idx % a.ldq;
    float v = 0.f;
    if (j < a.r) {
      v = a.scale * a.xa[m * a.ldxa + j];
    } else if (j < a.r + a.S) {
      const int64_t s = __ldg(reinterpret_cast<const long long*>(a.ids) + m * a.ids_stride);
      v = s == j - a.r ? 1.f : 0.f;
      if (j == a.r && s != -1 && (s < 0 || s >= a.S)) report_bad_id(a.id_error, s, a.S);  // once per row
    }
    store_from_float<D>(a.q, idx, v);
  }
}

// Validates ids where no other kernel visits them (an output without columns).
__global__ void scan_ids_kernel(const int64_t* ids, int64_t count, int64_t ids_stride, int64_t num_stitches,
                                long long* slot) {
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; m < count;
       m += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = ids[m * ids_stride];
    if (s < -1 || s >= num_stitches) report_bad_id(slot, s, num_stitches);
  }
}

__global__ void split_sum_kernel(const SplitSumArgs a) {
  const int64_t cols = a.cols_a + a.cols_b, total = a.I * cols;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / cols, j = idx % cols;
    float sum = 0.f;
    for (int64_t z = 0; z < a.splits; ++z) sum += a.ws[(z * a.I + i) * a.J + j];
    if (j < a.cols_a) {
      a.out_a[a.transpose_a ? j * a.ld_a + i : i * a.ld_a + j] = sum;
    } else {
      const int64_t jb = j - a.cols_a;
      a.out_b[a.transpose_b ? jb * a.ld_b + i : i * a.ld_b + jb] = sum;
    }
  }
}

unsigned grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

// ------------------------------------------------------------------------------------------ dispatch
struct Capability {
  int major = 0, minor = 0;
};

Capability device_capability(int device) {
  static std::array<std::atomic<int>, 64> cached{};  // major * 16 + minor + 1; 0 = not read yet
  int v = device >= 0 && device < 64 ? cached[device].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    v = major * 16 + minor + 1;
    if (device >= 0 && device < 64) cached[device].store(v, std::memory_order_relaxed);
  }
  return {(v - 1) / 16, (v - 1) % 16};
}

bool vectors_16b(const void* p, int64_t ld) { return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % 8 == 0; }

// Tensor cores read every operand in 16-byte vectors: aligned base, leading dimension and the extent along
// the contiguous dimension a multiple of 8 elements.
bool tensor_core_operands(const GemmArgs& g) {
  if (g.k[0] <= 0) return false;
  if (g.k_chunk > 0 && (g.k_chunk % 8 != 0 || g.k[1] > 0)) return false;
  for (int s = 0; s < 2; ++s) {
    if (s == 1 && g.k[1] == 0) break;
    const bool a_ok = vectors_16b(g.a[s], g.lda[s]) && (g.a_major == Major::kK ? g.k[s] % 8 == 0 : g.M % 8 == 0);
    const bool b_ok = vectors_16b(g.b[s], g.ldb[s]) && (g.b_major == Major::kK ? g.k[s] % 8 == 0 : g.N % 8 == 0);
    if (!a_ok || !b_ok) return false;
  }
  return true;
}

// The Hopper kernels: no split, alpha 1, one 16-bit output of every column that TMA can store.
bool sm90_shape(const GemmArgs& g) {
  const bool plain_out = g.k_chunk == 0 && g.alpha == 1.f && g.out != nullptr && !g.out_f32 && g.out2 == nullptr &&
                         g.out_n == g.N && vectors_16b(g.out, g.ldo) && g.N % 8 == 0;
  if (!plain_out || g.a_major != Major::kK) return false;
  if (g.b_major == Major::kK) return true;  // forward
  return g.bias == nullptr && g.ids == nullptr;  // dgrad: plain epilogue
}

template <Dtype D>
GemmPath launch_tensor_core(const GemmArgs& g, const Capability& cap, cudaStream_t stream) {
#if defined(ESTA_WITH_SM90A)
  if (cap.major == 9 && cap.minor == 0 && sm90_shape(g)) {
    if (g.b_major == Major::kK) {
      detail::launch_sm90_forward<D>(g, stream);
    } else {
      detail::launch_sm90_dgrad<D>(g, stream);
    }
    return GemmPath::kSm90;
  }
#endif
  if (g.a_major == Major::kK && g.b_major == Major::kK) {
    detail::launch_sm80<D, Major::kK, Major::kK>(g, stream);
  } else if (g.a_major == Major::kK && g.b_major == Major::kMN) {
    detail::launch_sm80<D, Major::kK, Major::kMN>(g, stream);
  } else {
    detail::launch_sm80<D, Major::kMN, Major::kMN>(g, stream);
  }
  return GemmPath::kSm80;
}

}  // namespace

namespace detail {
void launch_simt(Dtype dtype, const GemmArgs& g, cudaStream_t stream) {
  const int64_t splits = g.k_chunk > 0 ? (g.k[0] + g.k_chunk - 1) / g.k_chunk : 1;
  const dim3 grid(static_cast<unsigned>((g.M + kSBM - 1) / kSBM), static_cast<unsigned>((g.N + kSBN - 1) / kSBN),
                  static_cast<unsigned>(splits));
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "esta cuda backend: GEMM of ", g.M, " x ", g.N, " in ", splits,
              " splits exceeds the launch grid");
  switch (dtype) {
    case Dtype::kFloat16:
      simt_gemm_kernel<Dtype::kFloat16><<<grid, kSThreads, 0, stream>>>(g);
      break;
    case Dtype::kBFloat16:
      simt_gemm_kernel<Dtype::kBFloat16><<<grid, kSThreads, 0, stream>>>(g);
      break;
    case Dtype::kFloat32:
      simt_gemm_kernel<Dtype::kFloat32><<<grid, kSThreads, 0, stream>>>(g);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace detail

namespace {
std::array<std::atomic<int64_t>, 3> path_counts{};

GemmPath counted(GemmPath path) {
  path_counts[static_cast<int>(path)].fetch_add(1, std::memory_order_relaxed);
  return path;
}
}  // namespace

std::array<int64_t, 3> gemm_path_counts() {
  return {path_counts[0].load(), path_counts[1].load(), path_counts[2].load()};
}

GemmPath launch_gemm(Dtype dtype, const GemmArgs& args, cudaStream_t stream) {
  GemmArgs g = args;
  if (g.out_n < 0 || g.out_n > g.N) g.out_n = g.N;
  if (g.M == 0 || g.N == 0) return GemmPath::kSimt;  // nothing to write
  constexpr int64_t kIntMax = 0x7fffffff;
  TORCH_CHECK(g.M <= kIntMax && g.N <= kIntMax && g.k[0] <= kIntMax && g.k[1] <= kIntMax,
              "esta cuda backend: GEMM dimensions must be below 2^31, got ", g.M, " x ", g.N, " x ", g.k[0]);
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const Capability cap = device_capability(device);
  // the Ampere-class kernel is built for operands stored (K, K), (K, MN) and (MN, MN)
  const bool tc_layout = !(g.a_major == Major::kMN && g.b_major == Major::kK);
  if (dtype != Dtype::kFloat32 && cap.major >= 8 && tc_layout && tensor_core_operands(g)) {
    return counted(dtype == Dtype::kBFloat16 ? launch_tensor_core<Dtype::kBFloat16>(g, cap, stream)
                                             : launch_tensor_core<Dtype::kFloat16>(g, cap, stream));
  }
  detail::launch_simt(dtype, g, stream);
  return counted(GemmPath::kSimt);
}

bool built_with_sm90a() {
#if defined(ESTA_WITH_SM90A)
  return true;
#else
  return false;
#endif
}

long long* id_error_slot() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::array<std::atomic<long long*>, 64> slots{};
  long long* slot = device >= 0 && device < 64 ? slots[device].load(std::memory_order_relaxed) : nullptr;
  if (slot == nullptr) {
    void* p = nullptr;
    C10_CUDA_CHECK(cudaGetSymbolAddress(&p, g_stitch_id_error));
    slot = static_cast<long long*>(p);
    if (device >= 0 && device < 64) slots[device].store(slot, std::memory_order_relaxed);
  }
  return slot;
}

void launch_check_ids(const long long* slot, cudaStream_t stream) {
  check_ids_kernel<<<1, 1, 0, stream>>>(slot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_scan_ids(const int64_t* ids, int64_t count, int64_t ids_stride, int64_t num_stitches, long long* slot,
                     cudaStream_t stream) {
  if (count == 0) return;
  scan_ids_kernel<<<grid_for(count, 256), 256, 0, stream>>>(ids, count, ids_stride, num_stitches, slot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_build_lora_onehot(Dtype dtype, const OnehotArgs& args, cudaStream_t stream) {
  if (args.M == 0 || args.ldq == 0) return;
  const unsigned grid = grid_for(args.M * args.ldq, 256);
  switch (dtype) {
    case Dtype::kFloat16:
      lora_onehot_kernel<Dtype::kFloat16><<<grid, 256, 0, stream>>>(args);
      break;
    case Dtype::kBFloat16:
      lora_onehot_kernel<Dtype::kBFloat16><<<grid, 256, 0, stream>>>(args);
      break;
    case Dtype::kFloat32:
      lora_onehot_kernel<Dtype::kFloat32><<<grid, 256, 0, stream>>>(args);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_split_sum(const SplitSumArgs& args, cudaStream_t stream) {
  const int64_t total = args.I * (args.cols_a + args.cols_b);
  if (total == 0) return;
  split_sum_kernel<<<grid_for(total, 256), 256, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace esta_cuda
