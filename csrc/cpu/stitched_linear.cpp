// CPU kernels of esta::stitched_linear and esta::stitched_linear_backward (schemas in csrc/ops.cpp).
//
//   y = x @ W.T + bias + scale * (x @ A.T) @ B.T + stitch_bias[ids]
//
// Forward: a small GEMM gives xa = x @ A.T (M, r); one parallel pass writes, per row of y, a row of a
// small (S + 1, N) table (bias + stitch_bias[s]; the last row bias alone, for id -1) plus the rank-r update
// xa[m] @ (scale * B).T; then one BLAS GEMM adds x @ W.T onto y with beta = 1, the way addmm adds a bias.
// So y is written once by the pass and once by the GEMM, as F.linear writes it, and no (M, N) tensor
// exists besides y.
// Backward: g = scale * dy @ B (M, r); dx = g @ A, then the big GEMM adds dy @ W onto it (beta = 1);
// d lora_a = g.T @ x and d lora_b = scale * (xa.T @ dy).T are small GEMMs; d stitch_bias is a per-stitch
// column sum that each thread computes for its own block of columns, walking the rows in order, so the
// result is deterministic and does not depend on the thread count. No (M, N) temporary.
//
// float32/float64 are the fast path (accumulation in the input type). float16/bfloat16 run the big GEMMs
// in the half type, as F.linear does, and the rest in float32 on row blocks (bounded float32 buffers).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

// The extension is compiled for the baseline x86-64 ISA (SSE2); function clones let the loader pick an
// AVX2/AVX-512 build of the simple loops at run time.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__) && !defined(__APPLE__)
#define ESTA_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ESTA_VECTOR_CLONES
#endif

#if defined(__GNUC__)
#define ESTA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ESTA_ALWAYS_INLINE inline
#endif

namespace esta {
namespace {

using at::Tensor;

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// torch's names (float32, ...) rather than c10's (Float, ...), so messages read as in Python.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    default: return c10::toString(t);
  }
}

// "float32" or "<dtype> or float32": the dtypes allowed for LoRA and stitch-bias parameters.
std::string param_dtypes(at::ScalarType t) {
  return t == at::kFloat ? "float32" : dtype_name(t) + " or float32";
}

bool is_half_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

// Rows per block when half-precision inputs go through float32 buffers: bounds them to 512 x max(K, N).
constexpr int64_t kHalfBlockRows = 512;

// Runs fn(i) for every block i in [0, n) on the intra-op threads, each thread taking the next block as it
// finishes one: a thread that the OS preempts (two cores, shared) or that runs slower does not hold up the
// others, as it would with a static split. Every block is handled whole by one thread, so results do not
// depend on the scheduling.
template <typename F>
void parallel_blocks(int64_t n, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

// ------------------------------------------------------------------------------------- argument checks

void check_cpu(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the cpu backend, got a tensor on ",
                    t.device());
}

// Shared checks of x, weight and the LoRA pair; returns r (0 without LoRA).
int64_t check_linear_and_lora(const char* op, const Tensor& x, const Tensor& weight,
                              const c10::optional<Tensor>& lora_a, const c10::optional<Tensor>& lora_b) {
  check_cpu(op, "x", x);
  check_cpu(op, "weight", weight);
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
                   ": x must be float32, float64, float16 or bfloat16, got ", dtype_name(dt));
  TORCH_CHECK_TYPE(weight.scalar_type() == dt, op, ": x and weight must share one dtype (as in F.linear), got x ",
                   dtype_name(dt), " and weight ", dtype_name(weight.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D (N, K), got shape ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK_VALUE(x.size(1) == K, op, ": x's last dimension (", x.size(1), ") must equal weight's in_features K (",
                    K, ")");
  TORCH_CHECK_VALUE(lora_a.has_value() == lora_b.has_value(), op,
                    ": lora_a and lora_b must be given together (or both None)");
  if (!lora_a.has_value()) return 0;
  const Tensor& a = *lora_a;
  const Tensor& b = *lora_b;
  check_cpu(op, "lora_a", a);
  check_cpu(op, "lora_b", b);
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2, op, ": lora_a must be (r, K) and lora_b (N, r), got ", a.sizes(),
                    " and ", b.sizes());
  const int64_t r = a.size(0);
  TORCH_CHECK_VALUE(r >= 1, op, ": the LoRA rank r must be at least 1, got lora_a of shape ", a.sizes());
  TORCH_CHECK_VALUE(a.size(1) == K, op, ": lora_a must have shape (r, K) = (", r, ", ", K, "), got ", a.sizes());
  TORCH_CHECK_VALUE(b.size(0) == N && b.size(1) == r, op, ": lora_b must have shape (N, r) = (", N, ", ", r,
                    ") to match weight and lora_a, got ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == dt || a.scalar_type() == at::kFloat, op, ": lora_a must be ",
                   param_dtypes(dt), ", got ", dtype_name(a.scalar_type()));
  TORCH_CHECK_TYPE(b.scalar_type() == dt || b.scalar_type() == at::kFloat, op, ": lora_b must be ",
                   param_dtypes(dt), ", got ", dtype_name(b.scalar_type()));
  return r;
}

// Checks the ids (int64, M or 1 elements, every value in [-1, S)) and returns them contiguous.
Tensor check_ids(const char* op, const Tensor& ids, int64_t M, int64_t S) {
  check_cpu(op, "stitch_ids", ids);
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, op, ": stitch_ids must be an int64 tensor, got ",
                   dtype_name(ids.scalar_type()));
  TORCH_CHECK_VALUE(ids.dim() == 1 && (ids.numel() == M || ids.numel() == 1), op,
                    ": stitch_ids must be 1-D with M = ", M, " elements (one per row of x) or 1 element (one id for "
                    "every row), got shape ", ids.sizes());
  Tensor c = ids.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < c.numel(); ++i) {
    TORCH_CHECK_INDEX(p[i] >= -1 && p[i] < S, op, ": stitch_ids[", i, "] = ", p[i], " is outside [-1, ", S,
                      ") (S = ", S, " stitch-bias rows)");
  }
  return c;
}

// -------------------------------------------------------------------------------- forward per-row terms

// y[i, :] = table[row(i), :] + sum_j xa[i, j] * sbt[j, :] for `rows` rows of y (row stride N), where
// row(i) is ids[i * ids_stride], or default_row for a negative id or no ids.
template <typename T>
ESTA_ALWAYS_INLINE const T* table_row(const T* table, int64_t N, const int64_t* ids, int64_t ids_stride,
                                      int64_t default_row, int64_t i) {
  const int64_t s = ids == nullptr ? -1 : ids[i * ids_stride];
  return table + (s < 0 ? default_row : s) * N;
}

template <typename T, int kTileRows>
ESTA_ALWAYS_INLINE void rows_update_impl(T* y, int64_t rows, int64_t N, const T* table, const int64_t* ids,
                                         int64_t ids_stride, int64_t default_row, const T* xa, const T* sbt,
                                         int64_t r) {
  int64_t n_vec = 0;
#if defined(__GNUC__)
  // Per row, four 64-byte vectors of accumulators stay in registers across the r updates (explicit vectors:
  // auto-vectorized, GCC kept them on the stack); kTileRows rows share each load of sbt. Columns are the
  // outer loop, so the (r, chunk) slice of sbt stays in L1 while every row of the block reuses it.
  typedef T V __attribute__((vector_size(64), aligned(sizeof(T))));
  constexpr int64_t kLanes = 64 / sizeof(T);
  constexpr int64_t kChunk = 4 * kLanes;
  n_vec = N / kChunk * kChunk;
  for (int64_t n0 = 0; n0 < n_vec; n0 += kChunk) {
    int64_t i = 0;
    for (; i + kTileRows <= rows; i += kTileRows) {
      V c[kTileRows][4];
      const T* a[kTileRows];
      for (int q = 0; q < kTileRows; ++q) {
        const T* t = table_row(table, N, ids, ids_stride, default_row, i + q) + n0;
        for (int v = 0; v < 4; ++v) c[q][v] = *reinterpret_cast<const V*>(t + v * kLanes);
        a[q] = xa + (i + q) * r;
      }
      const T* b = r > 0 ? sbt + n0 : nullptr;
      for (int64_t j = 0; j < r; ++j, b += N) {
        V bv[4];
        for (int v = 0; v < 4; ++v) bv[v] = *reinterpret_cast<const V*>(b + v * kLanes);
        for (int q = 0; q < kTileRows; ++q) {
          const V w = V{} + a[q][j];
          for (int v = 0; v < 4; ++v) c[q][v] += w * bv[v];
        }
      }
      for (int q = 0; q < kTileRows; ++q) {
        V* out = reinterpret_cast<V*>(y + (i + q) * N + n0);
        for (int v = 0; v < 4; ++v) out[v] = c[q][v];
      }
    }
    for (; i < rows; ++i) {  // the rows left over from the tiles
      const T* t = table_row(table, N, ids, ids_stride, default_row, i) + n0;
      V c[4];
      for (int v = 0; v < 4; ++v) c[v] = *reinterpret_cast<const V*>(t + v * kLanes);
      const T* a = xa + i * r;
      const T* b = r > 0 ? sbt + n0 : nullptr;
      for (int64_t j = 0; j < r; ++j, b += N) {
        const V w = V{} + a[j];
        for (int v = 0; v < 4; ++v) c[v] += w * *reinterpret_cast<const V*>(b + v * kLanes);
      }
      V* out = reinterpret_cast<V*>(y + i * N + n0);
      for (int v = 0; v < 4; ++v) out[v] = c[v];
    }
  }
#endif
  // The columns past the last full chunk (all of them without vector extensions).
  for (int64_t i = 0; i < rows && n_vec < N; ++i) {
    const T* t = table_row(table, N, ids, ids_stride, default_row, i);
    const T* a = xa + i * r;
    for (int64_t k = n_vec; k < N; ++k) {
      T acc = t[k];
      for (int64_t j = 0; j < r; ++j) acc += a[j] * sbt[j * N + k];
      y[i * N + k] = acc;
    }
  }
}

// Builds of the kernel for the vector units found at run time (the extension is compiled for baseline
// x86-64): AVX-512 has 32 registers, room for two rows of accumulators; AVX2 has 16, room for one.
#define ESTA_ROWS_UPDATE_ARGS(T)                                                                          \
  T *y, int64_t rows, int64_t N, const T *table, const int64_t *ids, int64_t ids_stride, int64_t default_row, \
      const T *xa, const T *sbt, int64_t r
#define ESTA_ROWS_UPDATE_PASS y, rows, N, table, ids, ids_stride, default_row, xa, sbt, r

#if defined(__x86_64__) && defined(__GNUC__)
#define ESTA_X86_DISPATCH 1
template <typename T>
__attribute__((target("avx512f"))) void rows_update_avx512(ESTA_ROWS_UPDATE_ARGS(T)) {
  rows_update_impl<T, 2>(ESTA_ROWS_UPDATE_PASS);
}
template <typename T>
__attribute__((target("avx2,fma"))) void rows_update_avx2(ESTA_ROWS_UPDATE_ARGS(T)) {
  rows_update_impl<T, 1>(ESTA_ROWS_UPDATE_PASS);
}
#else
#define ESTA_X86_DISPATCH 0
#endif

template <typename T>
void rows_update(ESTA_ROWS_UPDATE_ARGS(T)) {
#if ESTA_X86_DISPATCH
  static const int isa = __builtin_cpu_supports("avx512f")                                  ? 2
                         : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1
                                                                                           : 0;
  if (isa == 2) return rows_update_avx512<T>(ESTA_ROWS_UPDATE_PASS);
  if (isa == 1) return rows_update_avx2<T>(ESTA_ROWS_UPDATE_PASS);
#endif
  rows_update_impl<T, 1>(ESTA_ROWS_UPDATE_PASS);
}

// One parallel pass over the rows of y (row-major, M x N, in the accumulation type) that writes the
// per-row terms table[row(m)] + xa[m] @ sbt; the GEMM then adds x @ W.T onto them.
template <typename acc_t>
void run_rows_update(Tensor& y, const Tensor& table, const Tensor& ids, int64_t default_row, const Tensor& xa,
                     const Tensor& sbt, int64_t r) {
  const int64_t M = y.size(0), N = y.size(1);
  acc_t* y_ptr = y.mutable_data_ptr<acc_t>();
  const acc_t* table_ptr = table.const_data_ptr<acc_t>();
  const int64_t* ids_ptr = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
  const int64_t ids_stride = ids.defined() && ids.numel() == M ? 1 : 0;
  const acc_t* xa_ptr = r > 0 ? xa.const_data_ptr<acc_t>() : nullptr;
  const acc_t* sbt_ptr = r > 0 ? sbt.const_data_ptr<acc_t>() : nullptr;
  // Blocks of rows whose y rows stay in L2 while the kernel walks the column chunks.
  const int64_t block = std::max<int64_t>(2, (256 << 10) / (std::max<int64_t>(N, 1) * int64_t(sizeof(acc_t))));
  parallel_blocks((M + block - 1) / block, [&](int64_t i) {
    const int64_t b0 = i * block, b1 = std::min(M, b0 + block);
    rows_update<acc_t>(y_ptr + b0 * N, b1 - b0, N, table_ptr, ids_ptr == nullptr ? nullptr : ids_ptr + b0 * ids_stride,
                       ids_stride, default_row, xa_ptr == nullptr ? nullptr : xa_ptr + b0 * r, sbt_ptr, r);
  });
}

// ------------------------------------------------------------------------------- stitch-bias column sum

// acc[id(m), c0:c1] += dy[m, c0:c1] for every row m in order (row stride ld); negative ids skip the row.
template <typename T, typename A>
ESTA_ALWAYS_INLINE void stitch_colsum_impl(A* acc, int64_t N, const T* dy, int64_t ld, int64_t M,
                                           const int64_t* ids, int64_t ids_stride, int64_t c0, int64_t c1) {
  for (int64_t m = 0; m < M; ++m) {
    const int64_t s = ids[m * ids_stride];
    if (s < 0) continue;
    A* out = acc + s * N;
    const T* in = dy + m * ld;
    for (int64_t c = c0; c < c1; ++c) out[c] += static_cast<A>(in[c]);
  }
}

ESTA_VECTOR_CLONES
void stitch_colsum(float* acc, int64_t N, const float* dy, int64_t ld, int64_t M, const int64_t* ids,
                   int64_t ids_stride, int64_t c0, int64_t c1) {
  stitch_colsum_impl(acc, N, dy, ld, M, ids, ids_stride, c0, c1);
}

ESTA_VECTOR_CLONES
void stitch_colsum(double* acc, int64_t N, const double* dy, int64_t ld, int64_t M, const int64_t* ids,
                   int64_t ids_stride, int64_t c0, int64_t c1) {
  stitch_colsum_impl(acc, N, dy, ld, M, ids, ids_stride, c0, c1);
}

template <typename T>
void stitch_colsum(float* acc, int64_t N, const T* dy, int64_t ld, int64_t M, const int64_t* ids,
                   int64_t ids_stride, int64_t c0, int64_t c1) {
  stitch_colsum_impl(acc, N, dy, ld, M, ids, ids_stride, c0, c1);
}

// d_stitch_bias (S, N) accumulator-typed, zero-filled; dy has unit column stride.
template <typename scalar_t>
void run_stitch_colsum(Tensor& dsb, const Tensor& dy, const Tensor& ids) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t M = dy.size(0), N = dy.size(1);
  acc_t* acc = dsb.mutable_data_ptr<acc_t>();
  const scalar_t* dy_ptr = dy.const_data_ptr<scalar_t>();
  const int64_t ld = dy.stride(0);
  const int64_t* ids_ptr = ids.const_data_ptr<int64_t>();
  const int64_t ids_stride = ids.numel() == M ? 1 : 0;
  // Every element of the result is summed by one thread, over the rows in order, whatever the blocks, so
  // the result does not depend on the number of threads. About four column blocks per thread, each at
  // least 64 columns wide (long contiguous runs of each row of dy).
  const int64_t cols = std::max<int64_t>(64, (N / (4 * at::get_num_threads()) + 15) / 16 * 16);
  parallel_blocks((N + cols - 1) / cols, [&](int64_t i) {
    stitch_colsum(acc, N, dy_ptr, ld, M, ids_ptr, ids_stride, i * cols, std::min(N, (i + 1) * cols));
  });
}

// ---------------------------------------------------------------------------------------------- forward

std::tuple<Tensor, Tensor> stitched_linear_cpu(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                               const c10::optional<Tensor>& lora_a,
                                               const c10::optional<Tensor>& lora_b,
                                               const c10::optional<Tensor>& stitch_bias,
                                               const c10::optional<Tensor>& stitch_ids, double scale) {
  constexpr const char* op = "esta::stitched_linear";
  const int64_t r = check_linear_and_lora(op, x, weight, lora_a, lora_b);
  const auto dt = x.scalar_type();
  const auto acc = acc_type(dt);
  const int64_t M = x.size(0), N = weight.size(0);
  if (bias.has_value()) {
    check_cpu(op, "bias", *bias);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",), got ",
                      bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == dt, op, ": bias must have x's dtype ", dtype_name(dt), ", got ",
                     dtype_name(bias->scalar_type()));
  }
  int64_t S = 0;
  if (stitch_bias.has_value()) {
    const Tensor& sb = *stitch_bias;
    check_cpu(op, "stitch_bias", sb);
    TORCH_CHECK_VALUE(sb.dim() == 2 && sb.size(1) == N, op, ": stitch_bias must have shape (S, N) with N = ", N,
                      ", got ", sb.sizes());
    TORCH_CHECK_TYPE(sb.scalar_type() == dt || sb.scalar_type() == at::kFloat, op, ": stitch_bias must be ",
                     param_dtypes(dt), ", got ", dtype_name(sb.scalar_type()));
    S = sb.size(0);
  }
  // Ids only matter with a stitch bias (without one they are ignored, as the contract says).
  Tensor ids;
  if (stitch_bias.has_value() && stitch_ids.has_value()) ids = check_ids(op, *stitch_ids, M, S);

  auto opts = x.options();
  Tensor y = at::empty({M, N}, opts);
  Tensor xa = at::empty({M, r}, opts.dtype(acc));
  if (M == 0) return {y, xa};

  const bool half = is_half_type(dt);
  const bool use_stitch = ids.defined();
  if (!use_stitch && !bias.has_value() && r == 0) {
    at::mm_out(y, x, weight.t());
    return {y, xa};
  }
  // table rows 0..S-1: bias + stitch_bias[s]; the last row: bias alone (id -1 or no ids).
  Tensor table = at::zeros({use_stitch ? S + 1 : 1, N}, opts.dtype(acc));
  if (use_stitch) table.narrow(0, 0, S).copy_(*stitch_bias);
  if (bias.has_value()) table.add_(bias->to(acc));
  const int64_t default_row = table.size(0) - 1;
  Tensor a, sbt;
  if (r > 0) {
    a = lora_a->to(acc);
    sbt = (lora_b->to(acc) * scale).t().contiguous();  // (r, N)
  }

  // First the per-row terms: xa, then y = table rows + scale * xa @ B.T. float32/float64 do it in one
  // block; half types in row blocks, which bounds the float32 copy of x that their float32 xa needs.
  const int64_t block = half ? kHalfBlockRows : M;
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t mb = std::min(block, M - m0);
    Tensor y_blk = y.narrow(0, m0, mb);
    Tensor xa_blk = xa.narrow(0, m0, mb);
    if (r > 0) {
      Tensor x_blk = x.narrow(0, m0, mb);
      at::mm_out(xa_blk, half ? x_blk.to(at::kFloat) : x_blk, a.t());
    }
    Tensor ids_blk = ids.defined() && ids.numel() == M ? ids.narrow(0, m0, mb) : ids;
    if (dt == at::kDouble) {
      run_rows_update<double>(y_blk, table, ids_blk, default_row, xa_blk, sbt, r);
    } else if (!half) {
      run_rows_update<float>(y_blk, table, ids_blk, default_row, xa_blk, sbt, r);
    } else {
      // Half types: the terms are summed in float32 in a block buffer and rounded once into y; the GEMM
      // then adds x @ W.T in float32 and rounds the sum again (as addmm does with a half bias).
      Tensor buf = at::empty({mb, N}, opts.dtype(at::kFloat));
      run_rows_update<float>(buf, table, ids_blk, default_row, xa_blk, sbt, r);
      y_blk.copy_(buf);
    }
  }
  // Then one GEMM adds x @ W.T onto them (beta = 1), the way addmm adds a bias: no second pass over y.
  y.addmm_(x, weight.t());
  return {y, xa};
}

// --------------------------------------------------------------------------------------------- backward

std::tuple<Tensor, Tensor, Tensor, Tensor> stitched_linear_backward_cpu(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& lora_a,
    const c10::optional<Tensor>& lora_b, const Tensor& lora_xa, const c10::optional<Tensor>& stitch_ids,
    int64_t num_stitches, double scale, std::array<bool, 4> output_mask) {
  constexpr const char* op = "esta::stitched_linear_backward";
  const int64_t r = check_linear_and_lora(op, x, weight, lora_a, lora_b);
  const auto dt = x.scalar_type();
  const auto acc = acc_type(dt);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check_cpu(op, "grad_y", grad_y);
  TORCH_CHECK_TYPE(grad_y.scalar_type() == dt, op, ": grad_y must have x's dtype ", dtype_name(dt), ", got ",
                   dtype_name(grad_y.scalar_type()));
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N, op,
                    ": grad_y must have shape (M, N) = (", M, ", ", N, "), got ", grad_y.sizes());
  TORCH_CHECK_VALUE(num_stitches >= 0, op, ": num_stitches must be >= 0, got ", num_stitches);
  const bool want_dx = output_mask[0];
  const bool want_da = output_mask[1] && r > 0;
  const bool want_db = output_mask[2] && r > 0;
  const bool want_ds = output_mask[3];
  if (want_db) {
    check_cpu(op, "lora_xa", lora_xa);
    TORCH_CHECK_TYPE(lora_xa.scalar_type() == acc, op, ": lora_xa must be ", dtype_name(acc),
                     " (the forward's x @ lora_a.T), got ", dtype_name(lora_xa.scalar_type()));
    TORCH_CHECK_VALUE(lora_xa.dim() == 2 && lora_xa.size(0) == M && lora_xa.size(1) == r, op,
                      ": lora_xa must have shape (M, r) = (", M, ", ", r, "), got ", lora_xa.sizes());
  }
  Tensor ids;
  if (want_ds && stitch_ids.has_value()) ids = check_ids(op, *stitch_ids, M, num_stitches);

  auto opts = x.options();
  auto acc_opts = opts.dtype(acc);
  Tensor dx = want_dx ? at::empty({M, K}, opts) : at::empty({0}, opts);
  Tensor da = want_da ? at::empty({r, K}, acc_opts) : at::empty({0}, acc_opts);
  Tensor db = want_db ? at::empty({N, r}, acc_opts) : at::empty({0}, acc_opts);
  Tensor ds = want_ds ? at::zeros({num_stitches, N}, acc_opts) : at::empty({0}, acc_opts);

  const bool half = is_half_type(dt);
  const bool need_g = r > 0 && (want_dx || want_da);
  Tensor a = r > 0 ? lora_a->to(acc) : Tensor();
  Tensor b_scaled = r > 0 ? lora_b->to(acc) * scale : Tensor();

  if (!half) {
    Tensor g;
    if (need_g) g = at::mm(grad_y, b_scaled);
    if (want_dx) {
      // The rank-r term is written first and the big GEMM adds onto it (beta = 1): one pass over dx fewer
      // than adding g @ A afterwards.
      if (need_g) {
        at::mm_out(dx, g, a);
        dx.addmm_(grad_y, weight);
      } else {
        at::mm_out(dx, grad_y, weight);
      }
    }
    if (want_da) at::mm_out(da, g.t(), x);
    if (want_db) {
      // (xa.T @ dy).T: MKL runs this orientation faster than dy.T @ xa; the output is a transposed view of db.
      Tensor db_t = db.t();
      at::mm_out(db_t, lora_xa.t(), grad_y);
      db.mul_(scale);
    }
  } else {
    // Half types: the big GEMM dy @ W runs in the half type (as in F.linear's backward); the LoRA terms
    // run in float32 on row blocks of dy converted to float32 (a bounded buffer, never (M, N)).
    if (want_dx) at::mm_out(dx, grad_y, weight);
    if (want_da) da.zero_();
    if (want_db) db.zero_();
    if (r > 0 && (want_dx || want_da || want_db)) {
      for (int64_t m0 = 0; m0 < M; m0 += kHalfBlockRows) {
        const int64_t mb = std::min(kHalfBlockRows, M - m0);
        Tensor dyf = grad_y.narrow(0, m0, mb).to(at::kFloat);
        if (want_db) db.addmm_(dyf.t(), lora_xa.narrow(0, m0, mb));
        if (need_g) {
          Tensor g = at::mm(dyf, b_scaled);
          if (want_dx) {
            Tensor dx_block = dx.narrow(0, m0, mb);
            dx_block.add_(at::mm(g, a));  // one float32 -> half rounding of the sum
          }
          if (want_da) da.addmm_(g.t(), x.narrow(0, m0, mb).to(at::kFloat));
        }
      }
      if (want_db) db.mul_(scale);
    }
  }

  if (want_ds && ids.defined() && M > 0 && num_stitches > 0 && N > 0) {
    // The column-sum kernel reads rows with unit column stride (the autograd formula passes contiguous dy).
    Tensor dy = grad_y.stride(1) == 1 ? grad_y : grad_y.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "esta_stitch_bias_grad", [&] {
      run_stitch_colsum<scalar_t>(ds, dy, ids);
    });
  }
  return {dx, da, db, ds};
}

}  // namespace
}  // namespace esta

TORCH_LIBRARY_IMPL(esta, CPU, m) {
  m.impl("stitched_linear", &esta::stitched_linear_cpu);
  m.impl("stitched_linear_backward", &esta::stitched_linear_backward_cpu);
}
