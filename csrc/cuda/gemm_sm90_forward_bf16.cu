// One Hopper GEMM instantiation per file, so that ninja compiles them in parallel (see gemm_sm90.cuh).
#include "gemm_sm90.cuh"

template void esta_cuda::detail::launch_sm90_forward<esta_cuda::Dtype::kBFloat16>(const esta_cuda::GemmArgs&, cudaStream_t);
