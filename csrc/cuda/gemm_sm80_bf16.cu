// The Ampere-class GEMM instantiations of one dtype (see gemm_sm80.cuh): operands stored (A, B) =
// (K, K) for the forward and the LoRA down-projection, (K, MN) for dx and g, (MN, MN) for the split
// reductions over rows of the backward.
#include "gemm_sm80.cuh"

namespace esta_cuda::detail {
template void launch_sm80<Dtype::kBFloat16, Major::kK, Major::kK>(const GemmArgs&, cudaStream_t);
template void launch_sm80<Dtype::kBFloat16, Major::kK, Major::kMN>(const GemmArgs&, cudaStream_t);
template void launch_sm80<Dtype::kBFloat16, Major::kMN, Major::kMN>(const GemmArgs&, cudaStream_t);
}  // namespace esta_cuda::detail
