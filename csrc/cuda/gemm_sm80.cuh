// The Ampere-class tensor-core GEMM of the stitched linear: CUTLASS 3's cp.async multistage main loop
// (CollectiveMma<MainloopSm80CpAsync>, mma.sync 16x8x16 with float accumulation), run once per reduction
// segment into the same accumulators, and the GemmArgs epilogue written straight from the accumulators.
// The forward and dx on sm_80-class GPUs; on Hopper the skinny GEMMs (the LoRA down-projection and g) and
// the split reductions of the backward, whose shapes do not fill a warp-specialized wgmma tile.
// Included by gemm_sm80_{bf16,f16}.cu; compiled for every target in TORCH_CUDA_ARCH_LIST.
#pragma once

#include <atomic>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/collective/collective_mma_decl.hpp>
#include <cutlass/gemm/collective/sm80_mma_multistage.hpp>  // not collective_mma.hpp: it includes every arch's
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/numeric_types.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "gemm_common.cuh"

namespace esta_cuda {
namespace sm80 {

using namespace cute;

template <Dtype D>
using Element = std::conditional_t<D == Dtype::kBFloat16, cutlass::bfloat16_t, cutlass::half_t>;

// Shared-memory layout, shared-to-register copy and global-to-shared copy of one operand tile (rows x 32),
// by how the operand is stored (the standard CUTLASS sm80 configurations for 16-bit operands).
template <class T, Major M>
struct OperandTraits;

template <class T>
struct OperandTraits<T, Major::kK> {  // rows of a row-major matrix: 16-byte vectors along k
  using SmemLayoutAtom = decltype(composition(Swizzle<2, 3, 3>{}, Layout<Shape<_8, _32>, Stride<_32, _1>>{}));
  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, T>;
  using GmemTiledCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, T>{},
                                                 Layout<Shape<_32, _4>, Stride<_4, _1>>{},
                                                 Layout<Shape<_1, _8>>{}));
  using Stride2 = Stride<int64_t, _1>;
  using Stride3 = Stride<int64_t, _1, int64_t>;
  CUTE_HOST_DEVICE static Stride2 stride(int64_t ld) { return make_stride(ld, Int<1>{}); }
};

template <class T>
struct OperandTraits<T, Major::kMN> {  // columns of a row-major matrix: 16-byte vectors along the rows
  using SmemLayoutAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_64, _8>, Stride<_1, _64>>{}));
  using SmemCopyAtom = Copy_Atom<SM75_U16x8_LDSM_T, T>;
  using GmemTiledCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, T>{},
                                                 Layout<Shape<_16, _8>, Stride<_1, _16>>{},
                                                 Layout<Shape<_8, _1>>{}));
  using Stride2 = Stride<_1, int64_t>;
  using Stride3 = Stride<_1, int64_t, int64_t>;
  CUTE_HOST_DEVICE static Stride2 stride(int64_t ld) { return make_stride(Int<1>{}, ld); }
};

template <Dtype D, Major MA, Major MB>
struct Config {
  using T = Element<D>;
  using TileShape = Shape<_128, _128, _32>;
  static constexpr int kStages = 4;
  static constexpr int kThreads = 128;
  using MmaAtom = std::conditional_t<D == Dtype::kBFloat16, SM80_16x8x16_F32BF16BF16F32_TN, SM80_16x8x16_F32F16F16F32_TN>;
  // 2 x 2 warps, each 64 x 64 of the tile; the 32 x 32 x 16 permutation lets ldmatrix fill two atoms at once
  using TiledMma = TiledMMA<MMA_Atom<MmaAtom>, Layout<Shape<_2, _2, _1>>, Tile<_32, _32, _16>>;
  using A = OperandTraits<T, MA>;
  using B = OperandTraits<T, MB>;
  using Mainloop = cutlass::gemm::collective::CollectiveMma<
      cutlass::gemm::MainloopSm80CpAsync<kStages>, TileShape, T, typename A::Stride3, T, typename B::Stride3, TiledMma,
      typename A::GmemTiledCopy, typename A::SmemLayoutAtom, typename A::SmemCopyAtom, cute::identity,
      typename B::GmemTiledCopy, typename B::SmemLayoutAtom, typename B::SmemCopyAtom, cute::identity>;
  // the epilogue stages the float accumulator tile in the same shared memory, rows padded against conflicts
  static constexpr int kTileLd = size<1>(TileShape{}) + 4;
  static constexpr int kSmemBytes =
      cute::max(static_cast<int>(sizeof(typename Mainloop::SharedStorage)), size<0>(TileShape{}) * kTileLd * 4);
  static_assert(size(TiledMma{}) == kThreads, "one thread per MMA thread");
};

// accum += A (M, K) . B (N, K)^T over the tiles (m_tile, n_tile); the collective predicates the M and N
// residues per row and the K residue in its first k tile (K, like every extent along a 16-byte vector,
// is a multiple of 8: the dispatcher checks).
template <class Cfg, class Accum>
__device__ __forceinline__ void accumulate_segment(Accum& accum, const void* a, int64_t lda, const void* b,
                                                   int64_t ldb, int M, int N, int K, int m_tile, int n_tile,
                                                   char* smem) {
  using T = typename Cfg::T;
  using TileShape = typename Cfg::TileShape;
  Tensor mA = make_tensor(make_gmem_ptr(static_cast<const T*>(a)), make_shape(M, K), Cfg::A::stride(lda));
  Tensor mB = make_tensor(make_gmem_ptr(static_cast<const T*>(b)), make_shape(N, K), Cfg::B::stride(ldb));
  Tensor gA = local_tile(mA, select<0, 2>(TileShape{}), make_coord(m_tile, _));  // (BLK_M,BLK_K,k)
  Tensor gB = local_tile(mB, select<1, 2>(TileShape{}), make_coord(n_tile, _));  // (BLK_N,BLK_K,k)
  const int k_tiles = size<2>(gA);
  auto residue_mnk = make_tuple(M - m_tile * int(size<0>(TileShape{})), N - n_tile * int(size<1>(TileShape{})),
                                K - int(size<2>(TileShape{})) * k_tiles);
  typename Cfg::Mainloop mainloop;
  mainloop(accum, gA, gB, accum, make_coord_iterator(k_tiles), k_tiles, residue_mnk, int(threadIdx.x), smem);
}

template <Dtype D, Major MA, Major MB>
__global__ void __launch_bounds__(128) gemm_kernel(const GemmArgs p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Cfg = Config<D, MA, MB>;
  using TileShape = typename Cfg::TileShape;
  extern __shared__ __align__(128) char smem[];
  const int m_tile = blockIdx.x, n_tile = blockIdx.y;
  const int64_t split = blockIdx.z;
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N);

  typename Cfg::TiledMma tiled_mma;
  Tensor accum = partition_fragment_C(tiled_mma, take<0, 2>(TileShape{}));  // (MMA,MMA_M,MMA_N) float
  clear(accum);

  // Segment 0 over this split's reduction range (the pointer moves to its first k), then segment 1.
  int64_t k_begin = 0, k_end = 0;
  split_range(p, split, k_begin, k_end);
  if (k_end > k_begin) {
    const int64_t a_off = MA == Major::kK ? k_begin : k_begin * p.lda[0];
    const int64_t b_off = MB == Major::kK ? k_begin : k_begin * p.ldb[0];
    accumulate_segment<Cfg>(accum, static_cast<const typename Cfg::T*>(p.a[0]) + a_off, p.lda[0],
                            static_cast<const typename Cfg::T*>(p.b[0]) + b_off, p.ldb[0], M, N,
                            static_cast<int>(k_end - k_begin), m_tile, n_tile, smem);
  }
  if (p.k[1] > 0) {
    accumulate_segment<Cfg>(accum, p.a[1], p.lda[1], p.b[1], p.ldb[1], M, N, static_cast<int>(p.k[1]), m_tile, n_tile,
                            smem);
  }

  // Epilogue: the accumulators go through shared memory (free once the main loop has drained), so that the
  // loop below is one small body whose stores are coalesced along the rows.
  float* tile = reinterpret_cast<float*>(smem);
  auto thr_mma = tiled_mma.get_thread_slice(threadIdx.x);
  Tensor tCcC = thr_mma.partition_C(make_identity_tensor(take<0, 2>(TileShape{})));  // tile coordinates
  CUTE_UNROLL
  for (int i = 0; i < size(accum); ++i) tile[get<0>(tCcC(i)) * Cfg::kTileLd + get<1>(tCcC(i))] = accum(i);
  __syncthreads();
  constexpr int kBM = size<0>(TileShape{}), kBN = size<1>(TileShape{});
  const int64_t m0 = int64_t(m_tile) * kBM, n0 = int64_t(n_tile) * kBN;
#pragma unroll 2
  for (int idx = threadIdx.x; idx < kBM * kBN; idx += Cfg::kThreads) {
    const int r = idx / kBN, c = idx % kBN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m < p.M && n < p.N) epilogue_store<D>(p, m, n, tile[r * Cfg::kTileLd + c], split);
  }
#endif
}

// Launches the kernel on GemmArgs the dispatcher has checked (16-bit operands with 16-byte vectors).
template <Dtype D, Major MA, Major MB>
void launch(const GemmArgs& g, cudaStream_t stream) {
  using Cfg = Config<D, MA, MB>;
  const int64_t splits = g.k_chunk > 0 ? (g.k[0] + g.k_chunk - 1) / g.k_chunk : 1;
  const dim3 grid(static_cast<unsigned>((g.M + 127) / 128), static_cast<unsigned>((g.N + 127) / 128),
                  static_cast<unsigned>(splits));
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "esta cuda backend: GEMM of ", g.M, " x ", g.N, " in ", splits,
              " splits exceeds the launch grid");
  auto kernel = &gemm_kernel<D, MA, MB>;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  static std::atomic<uint64_t> smem_set{0};  // opting in to > 48 KiB of shared memory is per device
  const uint64_t bit = uint64_t(1) << (device & 63);
  if ((smem_set.load(std::memory_order_relaxed) & bit) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
    smem_set.fetch_or(bit, std::memory_order_relaxed);
  }
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sm80

namespace detail {
template <Dtype D, Major MA, Major MB>
void launch_sm80(const GemmArgs& args, cudaStream_t stream) {
  sm80::launch<D, MA, MB>(args, stream);
}
}  // namespace detail
}  // namespace esta_cuda
