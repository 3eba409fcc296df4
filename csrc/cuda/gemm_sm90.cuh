// The Hopper GEMMs of the stitched linear: CUTLASS 3 TMA warp-specialized persistent kernels (ping-pong
// schedule: one warp group's epilogue overlaps the other's main loop) whose main loop runs over two
// reduction segments, and whose epilogue adds the bias and the stitch-bias row gather. Included by the
// per-instantiation files gemm_sm90_{forward,dgrad}_{bf16,f16}.cu; compiled for sm_90a (wgmma, TMA,
// setmaxnreg). Design: csrc/cuda/README.md.
#pragma once

#include <atomic>
#include <cstdint>

// Only the Hopper parts of CUTLASS: the umbrella headers (collective_builder.hpp, gemm_universal.hpp) pull in
// every architecture's collectives and kernels, which costs compile time on each of nvcc's passes.
#include <cute/tensor.hpp>
#include <cutlass/cluster_launch.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/device_kernel.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder_decl.hpp>
#include <cutlass/gemm/collective/collective_mma_decl.hpp>
#include <cutlass/gemm/collective/sm90_mma_tma_gmma_ss_warpspecialized.hpp>
#include <cutlass/gemm/collective/builders/sm90_gmma_builder.inl>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal_decl.h>
#include <cutlass/gemm/kernel/tile_scheduler.hpp>
#include <cutlass/gemm/kernel/sm90_gemm_tma_warpspecialized_pingpong.hpp>
#include <cutlass/kernel_hardware_info.hpp>
#include <cutlass/numeric_types.h>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "gemm_common.cuh"

namespace esta_cuda {
namespace sm90 {

using namespace cute;

template <Dtype D>
using Element = std::conditional_t<D == Dtype::kBFloat16, cutlass::bfloat16_t, cutlass::half_t>;

template <class T>
struct DtypeOf;
template <>
struct DtypeOf<cutlass::half_t> {
  static constexpr Dtype value = Dtype::kFloat16;
};
template <>
struct DtypeOf<cutlass::bfloat16_t> {
  static constexpr Dtype value = Dtype::kBFloat16;
};

// ------------------------------------------------------------------------------------------ main loop
// The collective the builder makes, with a second reduction segment: after the K tiles of (A, B) the
// producer warp loads the tiles of (A2, B2) through their own TMA descriptors into the same pipeline
// stages, and the consumer warp groups (the unchanged base mma()) accumulate them into the same
// accumulators. The kernel takes its K-tile count from the first tensor load_init returns, which spans
// both segments. Each segment's tail tile is zero-filled by TMA beyond its extent. Without a second
// segment (k2 = 0) its descriptors repeat the first segment's and are never used.
template <class Base>
struct TwoSegmentMainloop : Base {
  using typename Base::DispatchPolicy;
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TensorStorage;
  using typename Base::TileShape;
  using ClusterShape = typename DispatchPolicy::ClusterShape;
  using BaseArguments = typename Base::Arguments;
  using BaseParams = typename Base::Params;
  using TMA_A = typename BaseParams::TMA_A;
  using TMA_B = typename BaseParams::TMA_B;

  struct Arguments {
    ElementA const* ptr_A;
    StrideA dA;
    ElementB const* ptr_B;
    StrideB dB;
    ElementA const* ptr_A2;
    StrideA dA2;
    ElementB const* ptr_B2;
    StrideB dB2;
    int k2;  // reduction length of the second segment; 0: none
  };

  struct Params : BaseParams {
    TMA_A tma_load_a2;
    TMA_B tma_load_b2;
    int k2;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void* workspace) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    Params params;
    static_cast<BaseParams&>(params) =
        Base::to_underlying_arguments(problem_shape, BaseArguments{args.ptr_A, args.dA, args.ptr_B, args.dB}, workspace);
    const bool two = args.k2 > 0;
    const int k2 = two ? args.k2 : K;
    auto ptr_a2 = reinterpret_cast<InternalElementA const*>(two ? args.ptr_A2 : args.ptr_A);
    auto ptr_b2 = reinterpret_cast<InternalElementB const*>(two ? args.ptr_B2 : args.ptr_B);
    Tensor tensor_a2 = make_tensor(ptr_a2, make_layout(make_shape(M, k2, L), two ? args.dA2 : args.dA));
    Tensor tensor_b2 = make_tensor(ptr_b2, make_layout(make_shape(N, k2, L), two ? args.dB2 : args.dB));
    params.tma_load_a2 = make_tma_copy_A_sm90(GmemTiledCopyA{}, tensor_a2, SmemLayoutA{}(_, _, cute::Int<0>{}),
                                              TileShape{}, ClusterShape{});
    params.tma_load_b2 = make_tma_copy_B_sm90(GmemTiledCopyB{}, tensor_b2, SmemLayoutB{}(_, _, cute::Int<0>{}),
                                              TileShape{}, ClusterShape{});
    params.k2 = two ? args.k2 : 0;
    return params;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    bool ok = Base::can_implement(problem_shape, BaseArguments{args.ptr_A, args.dA, args.ptr_B, args.dB});
    if (args.k2 > 0) {
      ok = ok && Base::can_implement(make_shape(M, N, args.k2, L),
                                     BaseArguments{args.ptr_A2, args.dA2, args.ptr_B2, args.dB2});
    }
    return ok;
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params);
    if (params.k2 > 0) {
      cute::prefetch_tma_descriptor(params.tma_load_a2.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_load_b2.get_tma_descriptor());
    }
  }

  // Returns (A and B over both segments, for the kernel's tile counts; A, B of segment 1; A2, B2), each
  // tiled as (BLK, BLK_K, tile, k tile, l).
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    using X = Underscore;
    auto [M, N, K, L] = problem_shape_MNKL;
    constexpr int kBlkK = size<2>(TileShape{});
    const int k2 = params.k2 > 0 ? params.k2 : K;
    const int k_tiles = ceil_div(K, kBlkK) + (params.k2 > 0 ? ceil_div(params.k2, kBlkK) : 0);
    Tensor mA_all = params.tma_load_a.get_tma_tensor(make_shape(M, k_tiles * kBlkK, L));
    Tensor mB_all = params.tma_load_b.get_tma_tensor(make_shape(N, k_tiles * kBlkK, L));
    Tensor mA1 = params.tma_load_a.get_tma_tensor(make_shape(M, K, L));
    Tensor mB1 = params.tma_load_b.get_tma_tensor(make_shape(N, K, L));
    Tensor mA2 = params.tma_load_a2.get_tma_tensor(make_shape(M, k2, L));
    Tensor mB2 = params.tma_load_b2.get_tma_tensor(make_shape(N, k2, L));
    return cute::make_tuple(local_tile(mA_all, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{}),
                            local_tile(mB_all, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{}),
                            local_tile(mA1, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{}),
                            local_tile(mB1, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{}),
                            local_tile(mA2, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{}),
                            local_tile(mB2, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{}));
  }

  // Producer: one elected lane issues the TMA loads of k tiles [*k_tile_iter, + k_tile_count) of the
  // concatenated reduction, multicast across the cluster as the base collective does.
  template <class LoadInputs, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           LoadInputs const& load_inputs, BlockCoord const& blk_coord, KTileIterator k_tile_iter,
                           int k_tile_count, int thread_idx, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    int lane_predicate = cute::elect_one_sync();
    if (lane_predicate) {
      Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
      Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)

      constexpr uint32_t cluster_shape_x = get<0>(ClusterShape());
      uint2 cluster_local_block_id = {block_rank_in_cluster % cluster_shape_x, block_rank_in_cluster / cluster_shape_x};
      auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;

      Tensor gA1 = get<2>(load_inputs)(_, _, m_coord, _, l_coord);  // (BLK_M,BLK_K,k)
      Tensor gB1 = get<3>(load_inputs)(_, _, n_coord, _, l_coord);  // (BLK_N,BLK_K,k)
      Tensor gA2 = get<4>(load_inputs)(_, _, m_coord, _, l_coord);
      Tensor gB2 = get<5>(load_inputs)(_, _, n_coord, _, l_coord);
      const int k_tiles_1 = size<2>(gA1);

      auto block_tma_a = params.tma_load_a.get_slice(cluster_local_block_id.y);
      auto block_tma_b = params.tma_load_b.get_slice(cluster_local_block_id.x);
      auto block_tma_a2 = params.tma_load_a2.get_slice(cluster_local_block_id.y);
      auto block_tma_b2 = params.tma_load_b2.get_slice(cluster_local_block_id.x);
      Tensor tAgA1 = block_tma_a.partition_S(gA1);  // (TMA,TMA_M,TMA_K,k)
      Tensor tAsA1 = block_tma_a.partition_D(sA);   // (TMA,TMA_M,TMA_K,PIPE)
      Tensor tBgB1 = block_tma_b.partition_S(gB1);
      Tensor tBsB1 = block_tma_b.partition_D(sB);
      Tensor tAgA2 = block_tma_a2.partition_S(gA2);
      Tensor tAsA2 = block_tma_a2.partition_D(sA);
      Tensor tBgB2 = block_tma_b2.partition_S(gB2);
      Tensor tBsB2 = block_tma_b2.partition_D(sB);

      uint16_t mcast_mask_a = 0;
      uint16_t mcast_mask_b = 0;
      if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
        auto block_layout = Layout<ClusterShape>{};  // (m,n) -> block_id
        for (int n = 0; n < size<1>(block_layout); ++n) {
          mcast_mask_a |= (uint16_t(1) << block_layout(cluster_local_block_id.x, n, Int<0>{}));
        }
      }
      if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
        auto block_layout = Layout<ClusterShape>{};
        for (int m = 0; m < size<0>(block_layout); ++m) {
          mcast_mask_b |= (uint16_t(1) << block_layout(m, cluster_local_block_id.y, Int<0>{}));
        }
      }

      CUTLASS_PRAGMA_NO_UNROLL
      for (; k_tile_count > 0; --k_tile_count) {
        pipeline.producer_acquire(smem_pipe_write);
        using BarrierType = typename MainloopPipeline::ProducerBarrierType;
        BarrierType* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
        const int write_stage = smem_pipe_write.index();
        const int k_tile = *k_tile_iter;
        if (k_tile < k_tiles_1) {
          copy(params.tma_load_a.with(*tma_barrier, mcast_mask_a), tAgA1(_, _, _, k_tile), tAsA1(_, _, _, write_stage));
          copy(params.tma_load_b.with(*tma_barrier, mcast_mask_b), tBgB1(_, _, _, k_tile), tBsB1(_, _, _, write_stage));
        } else {
          const int k_tile_2 = k_tile - k_tiles_1;
          copy(params.tma_load_a2.with(*tma_barrier, mcast_mask_a), tAgA2(_, _, _, k_tile_2),
               tAsA2(_, _, _, write_stage));
          copy(params.tma_load_b2.with(*tma_barrier, mcast_mask_b), tBgB2(_, _, _, k_tile_2),
               tBsB2(_, _, _, write_stage));
        }
        ++k_tile_iter;
        ++smem_pipe_write;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------- epilogue node
// Epilogue visitor leaf: bias[n] + stitch_bias[ids[m], n] for each output element (m, n) of the tile,
// read from global memory (both are small and stay in L2). Elements outside the problem read nothing (the
// TMA store clips them). An id outside [0, S) adds nothing; one other than -1 is recorded in the device's
// error slot.
template <class ElementBias>
struct BiasStitchGather {
  struct SharedStorage {};

  struct Arguments {
    ElementBias const* bias = nullptr;  // (N,) or null
    void const* stitch_bias = nullptr;  // (S, N) row stride ld_stitch, float32 or ElementBias
    Dtype stitch_dtype = Dtype::kFloat32;
    int64_t ld_stitch = 0;
    int64_t num_stitches = 0;
    int64_t const* ids = nullptr;  // null: no stitch bias
    int64_t ids_stride = 0;
    long long* id_error = nullptr;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  CUTLASS_HOST_DEVICE BiasStitchGather() {}
  CUTLASS_HOST_DEVICE BiasStitchGather(Params const& params, SharedStorage const&) : params(params) {}

  Params params;

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(cutlass::epilogue::fusion::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::EmptyProducerLoadCallbacks{};
  }

  template <class CoordTensor>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CoordTensor tCcD, int m_origin, int n_origin, int M, int N,
                                          Params const& params)
        : tCcD(tCcD), m_origin(m_origin), n_origin(n_origin), M(M), N(N), params(params) {}

    CoordTensor tCcD;  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N): coordinates relative to (m_origin, n_origin)
    int m_origin, n_origin, M, N;
    Params const& params;

    template <typename ElementAccumulator, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(cutlass::Array<ElementAccumulator, FragmentSize> const&,
                                                             int epi_v, int epi_m, int epi_n) {
      cutlass::Array<float, FragmentSize> extra;
      Tensor tCcD_mn = tCcD(_, _, _, epi_m, epi_n);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        auto coord = tCcD_mn(epi_v * FragmentSize + i);
        const int m = m_origin + get<0>(coord);
        const int n = n_origin + get<1>(coord);
        float v = 0.f;
        if (m < M && n < N) {
          if (params.bias != nullptr) v = load_as_float(params.bias, DtypeOf<ElementBias>::value, n);
          v += stitch_bias_at(params.stitch_bias, params.stitch_dtype, params.ld_stitch, params.num_stitches,
                              params.ids, params.ids_stride, params.id_error, m, n);
        }
        extra[i] = v;
      }
      return extra;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(cutlass::epilogue::fusion::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    // residue_tCcD is (M, N) minus the absolute coordinate of this thread's first element, which is where
    // the relative coordinates of tCcD start.
    const int m_origin = M - get<0>(args.residue_tCcD);
    const int n_origin = N - get<1>(args.residue_tCcD);
    return ConsumerStoreCallbacks<decltype(args.tCcD)>(args.tCcD, m_origin, n_origin, M, N, params);
  }

};

// ----------------------------------------------------------------------------------------------- kernels
// Tile 128 x 128 x 64 per warp group, ping-pong, cluster 2 x 1 (the B tile, the weight, is multicast to
// the two CTAs of a cluster): the CUTLASS profiler's usual pick for large 16-bit GEMMs on H100 until
// measured here. The builder picks the stage count that fits beside the epilogue's shared memory.
using TileShape = Shape<_128, _128, _64>;
using ClusterShape = Shape<_2, _1, _1>;
using ProblemShape = Shape<int, int, int>;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

// Forward: y = [x | s*xa] . [W | B]^T + bias + stitch_bias[ids]; A (M, K) and B (N, K) K-major.
// dgrad: dx = [dy | g] . [W ; A]; A K-major, B (the weight read as (K, N)) MN-major, epilogue D = acc.
template <Dtype D, bool kForward>
struct Gemm {
  using T = Element<D>;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = std::conditional_t<kForward, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 8;  // 16 bytes

  using ForwardFusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, T, float, kRound>,
      cutlass::epilogue::fusion::Sm90AccFetch, BiasStitchGather<T>>;
  using PlainFusion = cutlass::epilogue::fusion::LinearCombination<T, float, void, float, kRound>;
  using Fusion = std::conditional_t<kForward, ForwardFusion, PlainFusion>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlign, T, LayoutD, kAlign,
      cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;

  using BuiltMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutA, kAlign, T, LayoutB, kAlign, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;
  using CollectiveMainloop = TwoSegmentMainloop<BuiltMainloop>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideD = typename Kernel::StrideD;
};

// Multiprocessor count of a device (the persistent grid's size), read once per device.
inline int sm_count(int device) {
  static std::atomic<int> counts[64];
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  int n = counts[device].load(std::memory_order_relaxed);
  if (n == 0) {
    n = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    counts[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// The kernel arguments of Gemm<D, kForward> for GemmArgs the dispatcher has checked: 16-bit operands,
// 16-byte aligned rows, no split, alpha 1, one 16-bit output covering every column.
template <Dtype D, bool kForward>
typename Gemm<D, kForward>::Kernel::Arguments make_arguments(const GemmArgs& g,
                                                             const cutlass::KernelHardwareInfo& hw_info) {
  using G = Gemm<D, kForward>;
  using T = typename G::T;
  const int M = static_cast<int>(g.M), N = static_cast<int>(g.N), K = static_cast<int>(g.k[0]);
  const int k2 = static_cast<int>(g.k[1]);

  // Strides of the rank-3 (row, k, batch) views: K-major operands (ld, 1, .), MN-major ones (1, ld, .). The
  // batch extent is 1; its stride is the packed one (rows * ld), as CUTLASS's own callers give, so that the TMA
  // descriptors see an ordinary third dimension.
  const int64_t M64 = g.M, N64 = g.N, K64 = g.k[0], K2_64 = g.k[1] > 0 ? g.k[1] : g.k[0];
  typename G::StrideA dA = make_stride(g.lda[0], Int<1>{}, M64 * g.lda[0]);
  typename G::StrideA dA2 = make_stride(g.lda[1], Int<1>{}, M64 * g.lda[1]);
  typename G::StrideB dB, dB2;
  if constexpr (kForward) {
    dB = make_stride(g.ldb[0], Int<1>{}, N64 * g.ldb[0]);
    dB2 = make_stride(g.ldb[1], Int<1>{}, N64 * g.ldb[1]);
  } else {
    dB = make_stride(Int<1>{}, g.ldb[0], K64 * g.ldb[0]);
    dB2 = make_stride(Int<1>{}, g.ldb[1], K2_64 * g.ldb[1]);
  }
  typename G::StrideD dD = make_stride(g.ldo, Int<1>{}, M64 * g.ldo);

  typename G::CollectiveMainloop::Arguments mainloop{
      static_cast<T const*>(g.a[0]), dA, static_cast<T const*>(g.b[0]), dB,
      static_cast<T const*>(g.a[1]), dA2, static_cast<T const*>(g.b[1]), dB2, k2};

  typename G::CollectiveEpilogue::Arguments epilogue{};
  if constexpr (kForward) {
    auto& gather = epilogue.thread.op_1;  // tree order: AccFetch, BiasStitchGather, plus
    gather.bias = static_cast<T const*>(g.bias);
    gather.stitch_bias = g.stitch_bias;
    gather.stitch_dtype = g.stitch_dtype;
    gather.ld_stitch = g.ld_stitch;
    gather.num_stitches = g.num_stitches;
    gather.ids = g.ids;
    gather.ids_stride = g.ids_stride;
    gather.id_error = g.id_error;
  } else {
    epilogue.thread.alpha = 1.f;
    epilogue.thread.beta = 0.f;
  }
  epilogue.ptr_C = nullptr;
  epilogue.dC = {};
  epilogue.ptr_D = static_cast<T*>(g.out);
  epilogue.dD = dD;

  return {cutlass::gemm::GemmUniversalMode::kGemm, ProblemShape{M, N, K}, mainloop, epilogue, hw_info};
}

template <Dtype D, bool kForward>
void launch(const GemmArgs& g, cudaStream_t stream) {
  using Kernel = typename Gemm<D, kForward>::Kernel;
  const int M = static_cast<int>(g.M), N = static_cast<int>(g.N), K = static_cast<int>(g.k[0]);
  const int k2 = static_cast<int>(g.k[1]);
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = device;
  hw_info.sm_count = sm_count(device);
  typename Kernel::Arguments args = make_arguments<D, kForward>(g, hw_info);
  TORCH_CHECK(Kernel::can_implement(args), "esta cuda backend: the Hopper GEMM cannot run ", M, " x ", N, " x ", K,
              " (+", k2, ") with these strides (an internal dispatch error)");
  TORCH_CHECK(Kernel::get_workspace_size(args) == 0, "esta cuda backend: the Hopper GEMM asks for a workspace");
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);

  const dim3 grid = Kernel::get_grid_shape(params);
  const dim3 block = Kernel::get_block_shape();
  const dim3 cluster(size<0>(ClusterShape{}), size<1>(ClusterShape{}), size<2>(ClusterShape{}));
  constexpr int kSmem = Kernel::SharedStorageSize;
  const void* kernel = reinterpret_cast<const void*>(&cutlass::device_kernel<Kernel>);
  // Opting in to more than 48 KiB of shared memory is per device; done once each.
  static std::atomic<uint64_t> smem_set{0};
  const uint64_t bit = uint64_t(1) << (device & 63);
  if ((smem_set.load(std::memory_order_relaxed) & bit) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    smem_set.fetch_or(bit, std::memory_order_relaxed);
  }
  void* kernel_params[] = {&params};
  const cutlass::Status status =
      cutlass::ClusterLauncher::launch(grid, cluster, block, kSmem, stream, kernel, kernel_params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(status == cutlass::Status::kSuccess, "esta cuda backend: the Hopper GEMM launch failed: ",
              cutlass::cutlassGetStatusString(status));
}

}  // namespace sm90

namespace detail {
template <Dtype D>
void launch_sm90_forward(const GemmArgs& args, cudaStream_t stream) {
  sm90::launch<D, true>(args, stream);
}
template <Dtype D>
void launch_sm90_dgrad(const GemmArgs& args, cudaStream_t stream) {
  sm90::launch<D, false>(args, stream);
}
}  // namespace detail
}  // namespace esta_cuda
