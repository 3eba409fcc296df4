// The `cuda` backend of esta::stitched_linear and esta::stitched_linear_backward: argument checks, operand
// preparation and the plan of GEMMs of each op (stitched_linear_kernels.cuh picks the kernel of each).
// Design: csrc/cuda/README.md.
#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "stitched_linear_kernels.cuh"

namespace {

using at::Tensor;
using esta_cuda::Dtype;
using esta_cuda::GemmArgs;
using esta_cuda::Major;

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

// The tensor cores' bfloat16 path and cp.async need sm_80; the kernels are built for TORCH_CUDA_ARCH_LIST.
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

void check_ids(const char* op, const Tensor& ids, const Tensor& x, int64_t M) {
  check_on_device(op, "stitch_ids", ids, x);
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, op, ": stitch_ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1 && (ids.numel() == M || ids.numel() == 1), op,
                    ": stitch_ids must be 1-D with M = ", M, " elements or 1 element, got shape ", ids.sizes());
}

int64_t round_up8(int64_t v) { return (v + 7) / 8 * 8; }

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Row-major with unit column stride, as the kernels read it; a 16-bit matrix whose rows could be read in
// 16-byte vectors (a multiple of 8 columns) but start unaligned (an offset view, a padded stride) is copied
// once, so that it reaches the tensor cores rather than the SIMT fallback.
Tensor kernel_operand(const Tensor& t) {
  Tensor out = t;
  if (!(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1) && t.stride(0) >= 0)) out = t.contiguous();
  if (out.scalar_type() != at::kFloat && out.size(1) % 8 == 0 && out.numel() > 0 &&
      (!aligned16(out) || out.stride(0) % 8 != 0)) {
    out = out.clone(at::MemoryFormat::Contiguous);
  }
  return out;
}

// A LoRA factor in the operand dtype, contiguous, 16-byte aligned, zero-padded to rows x cols (float32
// masters are rounded once here; the factors are (r, K) and (N, r)). The zero rows of lora_a and columns
// of lora_b make the padded rank columns of xa and g exactly zero, so the second reduction segment can run
// over r rounded up to 8.
Tensor lora_operand(const Tensor& t, at::ScalarType dtype, int64_t rows, int64_t cols) {
  Tensor out = t.to(dtype);
  if (rows > t.size(0) || cols > t.size(1)) {
    out = at::constant_pad_nd(out, {0, cols - t.size(1), 0, rows - t.size(0)});
  }
  out = out.contiguous();
  if (!aligned16(out)) out = out.clone(at::MemoryFormat::Contiguous);
  return out;
}

// A GEMM of M x N outputs over segment 0: A (M, k) and B (N, k) stored as a_major and b_major.
GemmArgs gemm_args(int64_t M, int64_t N, Major a_major, const Tensor& a, int64_t lda, Major b_major, const Tensor& b,
                   int64_t ldb, int64_t k) {
  GemmArgs g;
  g.M = M;
  g.N = N;
  g.a_major = a_major;
  g.b_major = b_major;
  g.a[0] = a.data_ptr();
  g.lda[0] = lda;
  g.b[0] = b.data_ptr();
  g.ldb[0] = ldb;
  g.k[0] = k;
  return g;
}

// Rows per split of a reduction over `rows` rows into an (I, J) output: about two waves of 128 x 128 tiles
// on the GPUs we target, at least 256 rows a split. Depends on the shapes only, so the reductions (and
// their fixed-order sums) are bitwise reproducible. 0: one split.
int64_t split_rows(int64_t rows, int64_t I, int64_t J) {
  const int64_t tiles = ((I + 127) / 128) * ((J + 127) / 128);
  int64_t splits = (256 + tiles - 1) / std::max<int64_t>(tiles, 1);
  splits = std::min(splits, (rows + 255) / 256);
  if (splits <= 1) return 0;
  const int64_t chunk = ((rows + splits - 1) / splits + 63) / 64 * 64;
  return chunk >= rows ? 0 : chunk;
}

// out (I, J) float32 partials per split of sum over rows m of P[m, i] * Q[m, j] (P (rows, I) and Q (rows, J)
// row-major, both stored "MN-major" for the GEMM); returns the workspace (splits, I, J) and sets *splits.
Tensor split_reduction(Dtype dt, const Tensor& p, const Tensor& q, int64_t rows, int64_t I, int64_t J,
                       int64_t* splits, cudaStream_t stream) {
  GemmArgs g = gemm_args(I, J, Major::kMN, p, p.stride(0), Major::kMN, q, q.stride(0), rows);
  g.k_chunk = split_rows(rows, I, J);
  *splits = g.k_chunk > 0 ? (rows + g.k_chunk - 1) / g.k_chunk : 1;
  Tensor ws = at::empty({*splits, I, J}, p.options().dtype(at::kFloat));
  g.out = ws.data_ptr();
  g.ldo = J;
  g.out_f32 = true;
  g.split_stride = I * J;
  esta_cuda::launch_gemm(dt, g, stream);
  return ws;
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

  Tensor y = at::empty({M, N}, x.options());
  Tensor xa = at::empty({M, r}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, xa};
  const Dtype dt = kernel_dtype(x.scalar_type());
  const Tensor xc = kernel_operand(x), wc = kernel_operand(weight);

  GemmArgs main = gemm_args(M, N, Major::kK, xc, xc.stride(0), Major::kK, wc, wc.stride(0), K);

  Tensor a_lp, b_lp, xa_lp, bias_c, sb_c;
  if (r > 0) {
    // xa = x @ A.T in float32 (saved for backward), and scale * xa in the operand dtype: the second reduction
    // segment of the main GEMM, so the up-projection runs on the tensor cores in W's accumulator.
    const int64_t r_pad = round_up8(r);
    a_lp = lora_operand(*lora_a, x.scalar_type(), r_pad, K);
    b_lp = lora_operand(*lora_b, x.scalar_type(), N, r_pad);
    xa_lp = at::empty({M, r_pad}, x.options());
    GemmArgs down = gemm_args(M, r_pad, Major::kK, xc, xc.stride(0), Major::kK, a_lp, K, K);
    down.out = xa.data_ptr();
    down.ldo = r;
    down.out_n = r;
    down.out_f32 = true;
    down.out2 = xa_lp.data_ptr();
    down.ldo2 = r_pad;
    down.alpha2 = static_cast<float>(scale);
    esta_cuda::launch_gemm(dt, down, stream);

    main.a[1] = xa_lp.data_ptr();
    main.lda[1] = r_pad;
    main.b[1] = b_lp.data_ptr();
    main.ldb[1] = r_pad;
    main.k[1] = r_pad;
  }
  if (bias) {
    bias_c = bias->contiguous();
    main.bias = bias_c.data_ptr();
  }
  long long* id_error = nullptr;
  if (use_stitch) {
    // Ids are checked on the device: the kernels record an id outside [-1, S) and launch_check_ids turns it
    // into a device-side assertion, without a host sync (and the same under CUDA-graph capture).
    id_error = esta_cuda::id_error_slot();
    sb_c = stitch_bias->stride(-1) == 1 ? *stitch_bias : stitch_bias->contiguous();
    main.stitch_bias = sb_c.data_ptr();
    main.stitch_dtype = kernel_dtype(sb_c.scalar_type());
    main.ld_stitch = sb_c.size(0) > 1 ? sb_c.stride(0) : N;
    main.num_stitches = sb_c.size(0);
    main.ids = stitch_ids->data_ptr<int64_t>();
    main.ids_stride = stitch_ids->numel() == 1 ? 0 : stitch_ids->stride(0);
    main.id_error = id_error;
  }
  main.out = y.data_ptr();
  main.ldo = N;
  esta_cuda::launch_gemm(dt, main, stream);
  if (use_stitch) {
    if (N == 0) {  // no epilogue read the ids
      esta_cuda::launch_scan_ids(main.ids, stitch_ids->numel(), stitch_ids->numel() == 1 ? 0 : stitch_ids->stride(0),
                                 main.num_stitches, id_error, stream);
    }
    esta_cuda::launch_check_ids(id_error, stream);
  }
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
  const Tensor dyc = kernel_operand(grad_y);
  const int64_t r_pad = round_up8(r);

  // g = scale * dy @ B (M, r_pad) in the operand dtype: the second reduction segment of dx = [dy | g] @ [W ; A]
  // and the right-hand side of d lora_a (its padded columns are zero).
  Tensor g;
  if (r > 0 && (need_dx || need_da)) {
    const Tensor b_lp = lora_operand(*lora_b, x.scalar_type(), N, r_pad);
    g = at::empty({M, r_pad}, x.options());
    GemmArgs gg = gemm_args(M, r_pad, Major::kK, dyc, dyc.stride(0), Major::kMN, b_lp, r_pad, N);
    gg.alpha = static_cast<float>(scale);
    gg.out2 = g.data_ptr();
    gg.ldo2 = r_pad;
    esta_cuda::launch_gemm(dt, gg, stream);
  }

  if (need_dx) {
    const Tensor wc = kernel_operand(weight);
    Tensor a_lp;
    GemmArgs d = gemm_args(M, K, Major::kK, dyc, dyc.stride(0), Major::kMN, wc, wc.stride(0), N);
    if (r > 0) {
      a_lp = lora_operand(*lora_a, x.scalar_type(), r_pad, K);
      d.a[1] = g.data_ptr();
      d.lda[1] = r_pad;
      d.b[1] = a_lp.data_ptr();
      d.ldb[1] = K;
      d.k[1] = r_pad;
    }
    d.out = dx.data_ptr();
    d.ldo = K;
    esta_cuda::launch_gemm(dt, d, stream);
  }

  if (need_da && K > 0) {
    // d lora_a (r, K) = g.T @ x, computed as x.T @ g (K, r_pad) split over rows, summed transposed.
    const Tensor xc = kernel_operand(x);
    int64_t splits = 0;
    const Tensor ws = split_reduction(dt, xc, g, M, K, r_pad, &splits, stream);
    esta_cuda::SplitSumArgs sum;
    sum.ws = ws.data_ptr<float>();
    sum.splits = splits;
    sum.I = K;
    sum.J = r_pad;
    sum.out_a = da.data_ptr<float>();
    sum.cols_a = r;
    sum.ld_a = K;
    sum.transpose_a = true;
    esta_cuda::launch_split_sum(sum, stream);
  }

  if ((need_db || use_ids) && N > 0) {
    // d lora_b (N, r) and d stitch_bias (S, N) from one pass over dy: dy.T @ [scale * xa | onehot(ids)].
    const int64_t q_r = need_db ? r : 0, q_s = use_ids ? num_stitches : 0, ldq = round_up8(q_r + q_s);
    long long* id_error = use_ids ? esta_cuda::id_error_slot() : nullptr;
    Tensor xa_c = need_db ? lora_xa.to(at::kFloat).contiguous() : Tensor();
    Tensor q = at::empty({M, ldq}, x.options());
    esta_cuda::OnehotArgs oh;
    oh.M = M;
    oh.r = q_r;
    oh.S = q_s;
    oh.ldq = ldq;
    oh.xa = need_db ? xa_c.data_ptr<float>() : nullptr;
    oh.ldxa = q_r;
    oh.scale = static_cast<float>(scale);
    if (use_ids) {
      oh.ids = stitch_ids->data_ptr<int64_t>();
      oh.ids_stride = stitch_ids->numel() == 1 ? 0 : stitch_ids->stride(0);
      oh.id_error = id_error;
    }
    oh.q = q.data_ptr();
    esta_cuda::launch_build_lora_onehot(dt, oh, stream);
    int64_t splits = 0;
    const Tensor ws = split_reduction(dt, dyc, q, M, N, ldq, &splits, stream);
    esta_cuda::SplitSumArgs sum;
    sum.ws = ws.data_ptr<float>();
    sum.splits = splits;
    sum.I = N;
    sum.J = ldq;
    if (need_db) {
      sum.out_a = db.data_ptr<float>();
      sum.cols_a = r;
      sum.ld_a = r;
    }
    if (use_ids) {
      sum.out_b = ds.data_ptr<float>();
      sum.cols_b = num_stitches;
      sum.ld_b = N;
      sum.transpose_b = true;
    }
    esta_cuda::launch_split_sum(sum, stream);
    if (use_ids) esta_cuda::launch_check_ids(id_error, stream);
  }
  return {dx, da, db, ds};
}

// Launches of each GEMM kernel family since the extension was loaded, [Hopper TMA/wgmma, Ampere-class
// mma.sync, SIMT], then 1 if the Hopper kernels were built (sm_90a) else 0. The GPU tests read it to prove
// which kernels ran.
std::vector<int64_t> cuda_gemm_path_counts() {
  const auto counts = esta_cuda::gemm_path_counts();
  return {counts[0], counts[1], counts[2], esta_cuda::built_with_sm90a() ? 1 : 0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(esta, m) {
  m.def("_cuda_gemm_path_counts() -> int[]", &cuda_gemm_path_counts);
}

TORCH_LIBRARY_IMPL(esta, CUDA, m) {
  m.impl("stitched_linear", &stitched_linear_cuda);
  m.impl("stitched_linear_backward", &stitched_linear_backward_cuda);
}
