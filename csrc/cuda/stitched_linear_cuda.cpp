// The `cuda` backend of esta::stitched_linear and esta::stitched_linear_backward: argument checks, the
// stitch-id validation, operand preparation and the kernel launches (stitched_linear_kernels.cu).
// Design: csrc/cuda/README.md.
#include <array>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "stitched_linear_kernels.cuh"

namespace {

using at::Tensor;
using esta_cuda::BLayout;
using esta_cuda::Dtype;
using esta_cuda::GemmArgs;
using esta_cuda::RowReduceArgs;

constexpr const char* kFwd = "esta::stitched_linear (cuda)";
constexpr const char* kBwd = "esta::stitched_linear_backward (cuda)";

Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      return Dtype::kFloat32;
  }
}

void check_operand_dtype(const char* op, const Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                   op, ": the cuda backend supports float32, float16 and bfloat16, got ", x.scalar_type(),
                   " (float64 runs on backend='torch' or 'cpu')");
}

void check_on_device(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": all tensors must be on one CUDA device: x is on ",
                    x.device(), ", ", name, " on ", t.device());
}

void check_param_dtype(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, op, ": ", name,
                   " must be ", x.scalar_type(), " or float32, got ", t.scalar_type());
}

// The tensor cores' bfloat16 path and cp.async need sm_80; the kernels are built for sm_80 and sm_90.
// A GEMM of M x N outputs reading a (M, k) and b (N, k) row-major (one reduction segment).
GemmArgs gemm_args(int64_t M, int64_t N, const Tensor& a, const Tensor& b, int64_t k) {
  GemmArgs g;
  g.M = M;
  g.N = N;
  g.a[0] = a.data_ptr();
  g.lda[0] = a.stride(0);
  g.b[0] = b.data_ptr();
  g.ldb[0] = b.stride(0);
  g.k[0] = k;
  return g;
}

// Checks lora_a (r, K) and lora_b (N, r) (both or neither) and returns r (0 without LoRA).
int64_t check_lora(const char* op, const std::optional<Tensor>& lora_a, const std::optional<Tensor>& lora_b,
                   const Tensor& x, int64_t K, int64_t N) {
  TORCH_CHECK_VALUE(lora_a.has_value() == lora_b.has_value(), op,
                    ": lora_a and lora_b must be given together (or both None)");
  if (!lora_a) return 0;
  const int64_t r = lora_a->size(0);
  check_on_device(op, "lora_a", *lora_a, x);
  check_on_device(op, "lora_b", *lora_b, x);
  TORCH_CHECK_VALUE(lora_a->dim() == 2 && lora_a->size(1) == K && r >= 1, op,
                    ": lora_a must be (r, K) with r >= 1 and K = ", K, ", got ", lora_a->sizes());
  TORCH_CHECK_VALUE(lora_b->dim() == 2 && lora_b->size(0) == N && lora_b->size(1) == r, op,
                    ": lora_b must be (N, r) = (", N, ", ", r, "), got ", lora_b->sizes());
  check_param_dtype(op, "lora_a", *lora_a, x);
  check_param_dtype(op, "lora_b", *lora_b, x);
  return r;
}

void check_capability(const char* op, c10::DeviceIndex device) {
  static std::array<int, 64> major_of{};  // 0 = not asked yet; devices are few and their capability fixed
  int major = device < 64 ? major_of[device] : 0;
  if (major == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (device < 64) major_of[device] = major;
  }
  TORCH_CHECK(major >= 8, op, ": the cuda backend needs a GPU of compute capability 8.0 or newer, device ",
              static_cast<int>(device), " has ", major, ".x; use backend='triton' or 'torch'");
}

// Row-major with unit column stride, as the kernels read it; anything else is copied once.
Tensor row_major(const Tensor& t) {
  if (t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1) && t.stride(0) >= 0) return t;
  return t.contiguous();
}

// The LoRA operands in the operand dtype (float32 masters are rounded once here; they are (r, K) and (N, r)).
Tensor in_dtype(const Tensor& t, const Tensor& x) { return t.to(x.scalar_type()).contiguous(); }

int64_t round_up8(int64_t v) { return (v + 7) / 8 * 8; }

void check_ids(const char* op, const Tensor& ids, const Tensor& x, int64_t M) {
  check_on_device(op, "stitch_ids", ids, x);
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, op, ": stitch_ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1 && (ids.numel() == M || ids.numel() == 1), op,
                    ": stitch_ids must be 1-D with M = ", M, " elements or 1 element, got shape ", ids.sizes());
}

// Policy for out-of-range stitch ids: one aminmax over the ids and a copy of its two numbers to the host,
// which waits for the stream (a sync per call that has ids). It runs before any output is written, so a bad
// id raises IndexError and leaves nothing half-done. While the stream is being captured into a CUDA graph no
// sync is allowed, so the check is skipped; the kernels then treat such ids as -1 (no stitch bias) and never
// form an address from them.
void validate_ids(const Tensor& ids, int64_t num_stitches, cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status != cudaStreamCaptureStatusNone || ids.numel() == 0) return;
  auto [lo, hi] = at::aminmax(ids);
  const Tensor both = at::stack({lo, hi}).cpu();
  const int64_t lo_v = both[0].item<int64_t>(), hi_v = both[1].item<int64_t>();
  const int64_t bad = lo_v < -1 ? lo_v : hi_v;
  TORCH_CHECK_INDEX(lo_v >= -1 && hi_v < num_stitches, "stitched_linear: stitch id ", bad, " is outside [-1, ",
                    num_stitches, ") (S = ", num_stitches, " stitch-bias rows)");
}

std::tuple<Tensor, Tensor> stitched_linear_cuda(const Tensor& x, const Tensor& weight,
                                                const std::optional<Tensor>& bias,
                                                const std::optional<Tensor>& lora_a,
                                                const std::optional<Tensor>& lora_b,
                                                const std::optional<Tensor>& stitch_bias,
                                                const std::optional<Tensor>& stitch_ids, double scale) {
  TORCH_CHECK_VALUE(x.is_cuda(), kFwd, ": x must be a CUDA tensor, got ", x.device());
  check_operand_dtype(kFwd, x);
  TORCH_CHECK_VALUE(x.dim() == 2, kFwd, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), kFwd, ": weight must be (N, K) with K = ",
                    x.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), kFwd, ": x and weight must share one dtype, got ",
                   x.scalar_type(), " and ", weight.scalar_type());
  check_on_device(kFwd, "weight", weight, x);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  if (bias) {
    check_on_device(kFwd, "bias", *bias, x);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, kFwd, ": bias must be (", N, ",), got ",
                      bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), kFwd, ": bias must be ", x.scalar_type(), ", got ",
                     bias->scalar_type());
  }
  const int64_t r = check_lora(kFwd, lora_a, lora_b, x, K, N);
  if (stitch_bias) {
    check_on_device(kFwd, "stitch_bias", *stitch_bias, x);
    TORCH_CHECK_VALUE(stitch_bias->dim() == 2 && stitch_bias->size(1) == N, kFwd,
                      ": stitch_bias must be (S, N) with N = ", N, ", got ", stitch_bias->sizes());
    check_param_dtype(kFwd, "stitch_bias", *stitch_bias, x);
  }
  const bool use_stitch = stitch_bias.has_value() && stitch_ids.has_value();
  if (use_stitch) check_ids(kFwd, *stitch_ids, x, M);

  const c10::cuda::CUDAGuard guard(x.device());
  check_capability(kFwd, x.device().index());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t S = stitch_bias ? stitch_bias->size(0) : 0;
  if (use_stitch) validate_ids(*stitch_ids, S, stream);

  Tensor y = at::empty({M, N}, x.options());
  Tensor xa = at::empty({M, r}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, xa};
  const Dtype dt = kernel_dtype(x.scalar_type());
  const Tensor xc = row_major(x), wc = row_major(weight);

  GemmArgs main = gemm_args(M, N, xc, wc, K);

  Tensor a_lp, b_lp, xa_lp, bias_c, sb_c, ids_c;
  if (r > 0) {
    // xa = x @ A.T in float32 (saved for backward), and scale * xa in the operand dtype: the second
    // reduction segment of the main GEMM, so the up-projection runs on the tensor cores with W's product.
    a_lp = in_dtype(*lora_a, x);
    b_lp = in_dtype(*lora_b, x);
    const int64_t r_pad = round_up8(r);  // 16-byte rows, so the main GEMM reads it with cp.async
    xa_lp = at::empty({M, r_pad}, x.options());
    GemmArgs down = gemm_args(M, r, xc, a_lp, K);
    down.out = xa.data_ptr();
    down.ldo = r;
    down.out_f32 = true;
    down.out2 = xa_lp.data_ptr();
    down.ldo2 = r_pad;
    down.alpha2 = static_cast<float>(scale);
    esta_cuda::launch_gemm(dt, BLayout::kNK, down, stream);

    main.a[1] = xa_lp.data_ptr();
    main.lda[1] = r_pad;
    main.b[1] = b_lp.data_ptr();
    main.ldb[1] = b_lp.stride(0);
    main.k[1] = r;
  }
  if (bias) {
    bias_c = bias->contiguous();
    main.bias = bias_c.data_ptr();
  }
  if (use_stitch && S > 0) {
    sb_c = stitch_bias->contiguous();
    ids_c = *stitch_ids;
    main.stitch_bias = sb_c.data_ptr();
    main.stitch_dtype = kernel_dtype(sb_c.scalar_type());
    main.ld_stitch = sb_c.stride(0);
    main.num_stitches = S;
    main.ids = ids_c.data_ptr<int64_t>();
    main.ids_stride = ids_c.numel() == 1 ? 0 : ids_c.stride(0);
  }
  main.out = y.data_ptr();
  main.ldo = N;
  esta_cuda::launch_gemm(dt, BLayout::kNK, main, stream);
  return {y, xa};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> stitched_linear_backward_cuda(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& lora_a,
    const std::optional<Tensor>& lora_b, const Tensor& lora_xa, const std::optional<Tensor>& stitch_ids,
    int64_t num_stitches, double scale, std::array<bool, 4> output_mask) {
  TORCH_CHECK_VALUE(x.is_cuda(), kBwd, ": x must be a CUDA tensor, got ", x.device());
  check_operand_dtype(kBwd, x);
  TORCH_CHECK_VALUE(x.dim() == 2, kBwd, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), kBwd, ": weight must be (N, K) with K = ",
                    x.size(1), ", got shape ", weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N, kBwd,
                    ": grad_y must be (M, N) = (", M, ", ", N, "), got ", grad_y.sizes());
  check_on_device(kBwd, "weight", weight, x);
  check_on_device(kBwd, "grad_y", grad_y, x);
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() && grad_y.scalar_type() == x.scalar_type(), kBwd,
                   ": x, weight and grad_y must share one dtype, got ", x.scalar_type(), ", ", weight.scalar_type(),
                   " and ", grad_y.scalar_type());
  const int64_t r = check_lora(kBwd, lora_a, lora_b, x, K, N);
  TORCH_CHECK_VALUE(num_stitches >= 0, kBwd, ": num_stitches must be >= 0, got ", num_stitches);
  const bool need_dx = output_mask[0], need_da = output_mask[1] && r > 0, need_db = output_mask[2] && r > 0,
             need_ds = output_mask[3];
  if (need_db) {
    check_on_device(kBwd, "lora_xa", lora_xa, x);
    TORCH_CHECK_VALUE(lora_xa.dim() == 2 && lora_xa.size(0) == M && lora_xa.size(1) == r, kBwd,
                      ": lora_xa must be (M, r) = (", M, ", ", r, "), got ", lora_xa.sizes());
  }
  const bool use_ids = need_ds && num_stitches > 0 && stitch_ids.has_value() && stitch_ids->numel() > 0;
  if (use_ids) check_ids(kBwd, *stitch_ids, x, M);

  const c10::cuda::CUDAGuard guard(x.device());
  check_capability(kBwd, x.device().index());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  if (use_ids) validate_ids(*stitch_ids, num_stitches, stream);

  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = need_dx ? at::empty({M, K}, x.options()) : at::empty({0}, x.options());
  Tensor da = need_da ? at::empty({r, K}, f32) : at::empty({0}, f32);
  Tensor db = need_db ? at::empty({N, r}, f32) : at::empty({0}, f32);
  Tensor ds = need_ds ? at::empty({num_stitches, N}, f32) : at::empty({0}, f32);
  if (M == 0) {  // sums over no rows
    da.zero_();
    db.zero_();
    ds.zero_();
    return {dx, da, db, ds};
  }
  if (need_ds && !use_ids) ds.zero_();  // no ids: no row picks a stitch

  const Dtype dt = kernel_dtype(x.scalar_type());
  const Tensor dyc = row_major(grad_y);
  const Tensor xc = row_major(x);

  // g = scale * dy @ B (M, r): float32 for d lora_a, and in the operand dtype as the second reduction
  // segment of dx = [dy | g] @ [W ; A].
  Tensor b_lp, a_lp, g, g_lp;
  const int64_t r_pad = round_up8(r);
  if (r > 0 && (need_dx || need_da)) {
    b_lp = in_dtype(*lora_b, x);
    GemmArgs gg = gemm_args(M, r, dyc, b_lp, N);
    gg.alpha = static_cast<float>(scale);
    if (need_da) {
      g = at::empty({M, r}, f32);
      gg.out = g.data_ptr();
      gg.ldo = r;
      gg.out_f32 = true;
    }
    if (need_dx) {
      g_lp = at::empty({M, r_pad}, x.options());
      gg.out2 = g_lp.data_ptr();
      gg.ldo2 = r_pad;
    }
    esta_cuda::launch_gemm(dt, BLayout::kKN, gg, stream);
  }

  if (need_dx) {
    const Tensor wc = row_major(weight);
    GemmArgs d = gemm_args(M, K, dyc, wc, N);
    if (r > 0) {
      a_lp = in_dtype(*lora_a, x);
      d.a[1] = g_lp.data_ptr();
      d.lda[1] = r_pad;
      d.b[1] = a_lp.data_ptr();
      d.ldb[1] = a_lp.stride(0);
      d.k[1] = r;
    }
    d.out = dx.data_ptr();
    d.ldo = K;
    esta_cuda::launch_gemm(dt, BLayout::kKN, d, stream);
  }

  if (need_da) {
    // d lora_a (r, K) = g.T @ x, computed as its transpose x.T @ g so x is the wide operand.
    RowReduceArgs ra;
    ra.M = M;
    ra.I = K;
    ra.J = r;
    ra.p = xc.data_ptr();
    ra.ldp = xc.stride(0);
    ra.q = g.data_ptr<float>();
    ra.ldq = r;
    ra.out = da.data_ptr<float>();
    ra.transpose_out = true;
    if (K > 0) {
      Tensor ws = at::empty({esta_cuda::row_reduce_workspace_floats(ra)}, f32);
      esta_cuda::launch_row_reduce(dt, ra, ws.data_ptr<float>(), stream);
    } else {
      da.zero_();
    }
  }

  if (need_db || use_ids) {
    // d lora_b (N, r) = scale * dy.T @ xa and d stitch_bias (S, N) in one pass over dy.
    Tensor xa_c, ids_c;
    RowReduceArgs rb;
    rb.M = M;
    rb.I = N;
    rb.p = dyc.data_ptr();
    rb.ldp = dyc.stride(0);
    rb.alpha = static_cast<float>(scale);
    if (need_db) {
      xa_c = lora_xa.to(at::kFloat).contiguous();
      rb.J = r;
      rb.q = xa_c.data_ptr<float>();
      rb.ldq = r;
      rb.out = db.data_ptr<float>();
    }
    if (use_ids) {
      ids_c = *stitch_ids;
      rb.ids = ids_c.data_ptr<int64_t>();
      rb.ids_stride = ids_c.numel() == 1 ? 0 : ids_c.stride(0);
      rb.num_stitches = num_stitches;
      rb.stitch_out = ds.data_ptr<float>();
    }
    if (N > 0) {
      Tensor ws = at::empty({esta_cuda::row_reduce_workspace_floats(rb)}, f32);
      esta_cuda::launch_row_reduce(dt, rb, ws.data_ptr<float>(), stream);
    }
  }
  return {dx, da, db, ds};
}

}  // namespace

TORCH_LIBRARY_IMPL(esta, CUDA, m) {
  m.impl("stitched_linear", &stitched_linear_cuda);
  m.impl("stitched_linear_backward", &stitched_linear_backward_cuda);
}
