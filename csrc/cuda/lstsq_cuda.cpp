// The `cuda` backend of esta::lstsq_accumulate: argument checks, operand preparation, the kernel launch
// (lstsq_kernels.cu), the fixed-order float64 sum of the per-split partials and the mirrored gram triangle.
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lstsq_kernels.cuh"

namespace {

using at::Tensor;
using esta_cuda::LstsqArgs;
using esta_cuda::LstsqDtype;

constexpr const char* kOp = "esta::lstsq_accumulate (cuda)";

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

LstsqDtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return LstsqDtype::kFloat16;
    case at::kBFloat16:
      return LstsqDtype::kBFloat16;
    case at::kDouble:
      return LstsqDtype::kFloat64;
    default:
      return LstsqDtype::kFloat32;
  }
}

int num_sms(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

std::tuple<Tensor, Tensor> lstsq_accumulate_cuda(const Tensor& h_in, const Tensor& h_out, const Tensor& shift_in,
                                                 const Tensor& shift_out) {
  TORCH_CHECK_VALUE(h_in.dim() == 2, kOp, ": h_in must be 2-D (n, d_in), got shape ", h_in.sizes());
  TORCH_CHECK_VALUE(h_out.dim() == 2, kOp, ": h_out must be 2-D (n, d_out), got shape ", h_out.sizes());
  TORCH_CHECK_VALUE(h_in.size(0) == h_out.size(0), kOp, ": h_in and h_out must have the same number of rows, got ",
                    h_in.size(0), " and ", h_out.size(0));
  const int64_t n = h_in.size(0), d_in = h_in.size(1), d_out = h_out.size(1);
  TORCH_CHECK_VALUE(d_in > 0, kOp, ": h_in has no features (shape ", h_in.sizes(), ")");
  TORCH_CHECK_VALUE(d_out > 0, kOp, ": h_out has no features (shape ", h_out.sizes(), ")");
  const int64_t blocks = (n + 1023) / 1024;
  TORCH_CHECK_VALUE((shift_in.dim() == 1 && shift_in.size(0) == d_in) ||
                        (shift_in.dim() == 2 && shift_in.size(0) == blocks && shift_in.size(1) == d_in),
                    kOp, ": shift_in must have shape (", d_in, ",) or (", blocks, ", ", d_in,
                    ") (one row per block of 1024 rows), got ", shift_in.sizes());
  TORCH_CHECK_VALUE((shift_out.dim() == 1 && shift_out.size(0) == d_out) ||
                        (shift_out.dim() == 2 && shift_out.size(0) == blocks && shift_out.size(1) == d_out),
                    kOp, ": shift_out must have shape (", d_out, ",) or (", blocks, ", ", d_out,
                    ") (one row per block of 1024 rows), got ", shift_out.sizes());
  TORCH_CHECK_TYPE(is_float(h_in.scalar_type()), kOp,
                   ": h_in must be float32, float16, bfloat16 or float64, got ", h_in.scalar_type());
  TORCH_CHECK_TYPE(is_float(h_out.scalar_type()), kOp,
                   ": h_out must be float32, float16, bfloat16 or float64, got ", h_out.scalar_type());
  TORCH_CHECK_TYPE(shift_in.scalar_type() == at::kFloat || shift_in.scalar_type() == at::kDouble, kOp,
                   ": shift_in must be float32 (or float64), got ", shift_in.scalar_type());
  TORCH_CHECK_TYPE(shift_out.scalar_type() == at::kFloat || shift_out.scalar_type() == at::kDouble, kOp,
                   ": shift_out must be float32 (or float64), got ", shift_out.scalar_type());
  TORCH_CHECK_VALUE(h_in.is_cuda(), kOp, ": h_in must be a CUDA tensor, got ", h_in.device());
  TORCH_CHECK_VALUE(h_out.device() == h_in.device(), kOp, ": all tensors must be on one CUDA device: h_in is on ",
                    h_in.device(), ", h_out on ", h_out.device());
  TORCH_CHECK_VALUE(shift_in.device() == h_in.device(), kOp,
                    ": all tensors must be on one CUDA device: h_in is on ", h_in.device(), ", shift_in on ",
                    shift_in.device());
  TORCH_CHECK_VALUE(shift_out.device() == h_in.device(), kOp,
                    ": all tensors must be on one CUDA device: h_in is on ", h_in.device(), ", shift_out on ",
                    shift_out.device());

  const c10::cuda::CUDAGuard guard(h_in.device());
  const auto f64 = h_in.options().dtype(at::kDouble);
  if (n == 0) return {at::zeros({d_in + 1, d_in + 1}, f64), at::zeros({d_in + 1, d_out}, f64)};

  // The kernel reads one element type: a mixed pair (rare) is converted to the common type (float16 with
  // bfloat16 gives float32), which loses nothing.
  const at::ScalarType dt = at::promote_types(h_in.scalar_type(), h_out.scalar_type());
  const Tensor a = h_in.scalar_type() == dt ? h_in : h_in.to(dt);
  const Tensor b = h_out.scalar_type() == dt ? h_out : h_out.to(dt);
  // u and v are float32 (float64 inputs subtract a float64 shift before rounding), as the contract says.
  const at::ScalarType shift_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor s_in = shift_in.to(shift_dt).contiguous();
  const Tensor s_out = shift_out.to(shift_dt).contiguous();

  LstsqArgs p;
  p.n = n;
  p.d_in = d_in;
  p.d_out = d_out;
  p.h_in = a.data_ptr();
  p.in_stride_m = a.stride(0);
  p.in_stride_k = a.stride(1);
  p.h_out = b.data_ptr();
  p.out_stride_m = b.stride(0);
  p.out_stride_k = b.stride(1);
  p.shift_in = s_in.data_ptr();
  p.shift_out = s_out.data_ptr();
  p.shift_in_stride_b = s_in.dim() == 2 ? s_in.stride(0) : 0;
  p.shift_out_stride_b = s_out.dim() == 2 ? s_out.stride(0) : 0;
  esta_cuda::lstsq_row_splits(n, d_in, d_out, num_sms(h_in.get_device()), &p.rows_per_split, &p.splits);
  Tensor partials = at::empty({p.splits, d_in + 1, d_in + 1 + d_out}, f64);
  p.partials = partials.data_ptr<double>();
  esta_cuda::launch_lstsq_accumulate(kernel_dtype(dt), p, c10::cuda::getCurrentCUDAStream(h_in.get_device()));

  // A reduction over the leading dimension of a fixed shape: a fixed order, no atomics.
  const Tensor total = p.splits == 1 ? partials[0] : partials.sum(0);
  // The gram part's entries below the diagonal were not written: take the upper triangle and mirror it.
  const Tensor upper = total.narrow(1, 0, d_in + 1).triu();
  Tensor gram = upper + upper.triu(1).t();
  Tensor cross = total.narrow(1, d_in + 1, d_out).contiguous();
  return {gram, cross};
}

}  // namespace

TORCH_LIBRARY_IMPL(esta, CUDA, m) { m.impl("lstsq_accumulate", &lstsq_accumulate_cuda); }
