// CPU kernels of esta::stitched_linear and esta::stitched_linear_backward (schemas in esta_kernels/_ext.py).
//
//   y = x @ W.T + bias + scale * (x @ A.T) @ B.T + stitch_bias[ids]
//
// Forward: a small GEMM gives xa = x @ A.T (M, r); one parallel pass writes, per row of y, a row of a
// small (S + 1, N) table (bias + stitch_bias[s]; the last row bias alone, for id -1) plus the rank-r update
// xa[m] @ (scale * B).T; then one BLAS GEMM adds x @ W.T onto y with beta = 1, the way addmm adds a bias.
// So y is written once by the pass and once by the GEMM, as F.linear writes it, and no (M, N) tensor
// exists besides y.
// Backward: one parallel pass reads dy once, in memory order, and gives g = scale * dy @ B (M, r),
// d lora_b = scale * (xa.T @ dy).T and d stitch_bias (the per-stitch sums of dy rows); the last two are
// summed over fixed chunks of rows whose partials are added in chunk order, so they are deterministic and
// do not depend on the thread count. Then dx = g @ A, onto which the big GEMM adds dy @ W (beta = 1), and
// d lora_a = g.T @ x. No (M, N) temporary.
//
// float32/float64 are the fast path (accumulation in the input type); its loops are built for AVX-512,
// AVX2 and baseline vectors, picked at run time. float16/bfloat16 run the big GEMMs in the half type, as
// F.linear does, and the rest in float32 on row blocks (bounded float32 buffers).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>

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

// The table row of row i: ids[i * ids_stride], or default_row for a negative id or no ids.
template <typename T>
ESTA_ALWAYS_INLINE const T* table_row(const T* table, int64_t N, const int64_t* ids, int64_t ids_stride,
                                      int64_t default_row, int64_t i) {
  const int64_t s = ids == nullptr ? -1 : ids[i * ids_stride];
  return table + (s < 0 ? default_row : s) * N;
}

// y[i, :] = table[row(i), :] + sum_j xa[i, j] * sbt[j, :] for `rows` rows of y (row stride N).
template <typename T, int kTileRows, int kVecBytes>
ESTA_ALWAYS_INLINE void rows_update_impl(T* y, int64_t rows, int64_t N, const T* table, const int64_t* ids,
                                         int64_t ids_stride, int64_t default_row, const T* xa, const T* sbt,
                                         int64_t r) {
  int64_t n_vec = 0;
#if defined(__GNUC__)
  // Per row, four vectors of accumulators (kVecBytes: the register width) stay in registers across the r
  // updates (explicit vectors: auto-vectorized, GCC kept them on the stack); kTileRows rows share each load
  // of sbt. Columns are the outer loop, so the (r, chunk) slice of sbt stays in L1 while every row of the
  // block reuses it.
  typedef T V __attribute__((vector_size(kVecBytes), aligned(sizeof(T))));
  constexpr int64_t kLanes = kVecBytes / sizeof(T);
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
// x86-64), each with vectors of the register width: two rows of four accumulators fit the 16 registers of
// SSE2/AVX2 and the 32 of AVX-512.
#define ESTA_ROWS_UPDATE_ARGS(T)                                                                          \
  T *y, int64_t rows, int64_t N, const T *table, const int64_t *ids, int64_t ids_stride, int64_t default_row, \
      const T *xa, const T *sbt, int64_t r
#define ESTA_ROWS_UPDATE_PASS y, rows, N, table, ids, ids_stride, default_row, xa, sbt, r

#if defined(__x86_64__) && defined(__GNUC__)
#define ESTA_X86_DISPATCH 1
template <typename T>
__attribute__((target("avx512f"))) void rows_update_avx512(ESTA_ROWS_UPDATE_ARGS(T)) {
  rows_update_impl<T, 2, 64>(ESTA_ROWS_UPDATE_PASS);
}
template <typename T>
__attribute__((target("avx2,fma"))) void rows_update_avx2(ESTA_ROWS_UPDATE_ARGS(T)) {
  rows_update_impl<T, 2, 32>(ESTA_ROWS_UPDATE_PASS);
}
#else
#define ESTA_X86_DISPATCH 0
#endif

#if ESTA_X86_DISPATCH
// 2: AVX-512, 1: AVX2 with FMA, 0: neither (baseline SSE2 builds).
int cpu_vector_level() {
  if (__builtin_cpu_supports("avx512f")) return 2;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}
#endif

template <typename T>
void rows_update(ESTA_ROWS_UPDATE_ARGS(T)) {
#if ESTA_X86_DISPATCH
  static const int isa = cpu_vector_level();
  if (isa == 2) return rows_update_avx512<T>(ESTA_ROWS_UPDATE_PASS);
  if (isa == 1) return rows_update_avx2<T>(ESTA_ROWS_UPDATE_PASS);
#endif
  rows_update_impl<T, 2, 16>(ESTA_ROWS_UPDATE_PASS);
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

// ------------------------------------------------------------------------- backward: one pass over dy

// An unaligned vector load (a macro: lambdas do not inherit the target attribute of the kernel builds).
#define ESTA_LOADV(p) (*reinterpret_cast<const V*>(p))

// For the rows [m0, m1) of dy (row stride ld, unit column stride), each optional:
//   g[m, j] = sum_n dy[m, n] * bst[j, n]                       (bst = scale * B.T, (r, N): g = scale * dy @ B)
//   dbt[j, n] += sum_m xa[m, j] * dy[m, n]                     (this chunk's part of xa.T @ dy, zeroed first)
//   ds[s, n] += sum of dy[m, n] over the rows m whose id is s  (this chunk's part of d stitch_bias; -1 skips)
// The sums into dbt and ds run over the rows in order. dy is read once, in memory order.
template <typename T, int kVecBytes>
ESTA_ALWAYS_INLINE void dy_rows_impl(const T* __restrict dy, int64_t ld, int64_t m0, int64_t m1, int64_t N,
                                     int64_t r, const T* __restrict bst, T* __restrict g, const T* __restrict xa,
                                     T* __restrict dbt, const int64_t* ids, int64_t ids_stride, T* __restrict ds) {
  int64_t nv = 0;  // columns covered by whole vectors; the rest are summed by scalar loops
#if defined(__GNUC__)
  typedef T V __attribute__((vector_size(kVecBytes), aligned(sizeof(T))));
  constexpr int64_t kLanes = kVecBytes / sizeof(T);
  constexpr int kJ = 8;     // accumulators of g (one per rank of a group), in registers across a row
  constexpr int kRows = 8;  // rows of dy held in registers while each dbt vector is updated once
  nv = N / kLanes * kLanes;
#endif
  for (int64_t t0 = m0; t0 < m1;) {
    int64_t t1 = std::min(m1, t0 + 8);
    if (g != nullptr) {
      for (int64_t m = t0; m < t1; ++m) {
        const T* d = dy + m * ld;
        int64_t j0 = 0;
#if defined(__GNUC__)
        for (; j0 + kJ <= r; j0 += kJ) {
          V acc[kJ];
          for (int q = 0; q < kJ; ++q) acc[q] = V{};
          for (int64_t c = 0; c < nv; c += kLanes) {
            const V dv = ESTA_LOADV(d + c);
            for (int q = 0; q < kJ; ++q) acc[q] += dv * ESTA_LOADV(bst + (j0 + q) * N + c);
          }
          for (int q = 0; q < kJ; ++q) {
            T sum = T(0);
            for (int64_t l = 0; l < kLanes; ++l) sum += acc[q][l];
            for (int64_t c = nv; c < N; ++c) sum += d[c] * bst[(j0 + q) * N + c];
            g[m * r + j0 + q] = sum;
          }
        }
#endif
        for (; j0 < r; ++j0) {  // ranks past the last full group
          T sum = T(0);
          for (int64_t c = 0; c < N; ++c) sum += d[c] * bst[j0 * N + c];
          g[m * r + j0] = sum;
        }
      }
    }
    if (dbt != nullptr) {
      int64_t m = t0;
#if defined(__GNUC__)
      if (t1 - t0 == kRows) {
        for (int64_t c = 0; c < nv; c += kLanes) {
          V dv[kRows];
          for (int q = 0; q < kRows; ++q) dv[q] = ESTA_LOADV(dy + (t0 + q) * ld + c);
          for (int64_t j = 0; j < r; ++j) {
            V acc = ESTA_LOADV(dbt + j * N + c);
            for (int q = 0; q < kRows; ++q) acc += (V{} + xa[(t0 + q) * r + j]) * dv[q];
            *reinterpret_cast<V*>(dbt + j * N + c) = acc;
          }
        }
        for (int q = 0; q < kRows && nv < N; ++q) {
          for (int64_t j = 0; j < r; ++j) {
            const T x = xa[(t0 + q) * r + j];
            for (int64_t c = nv; c < N; ++c) dbt[j * N + c] += x * dy[(t0 + q) * ld + c];
          }
        }
        m = t1;
      }
#endif
      for (; m < t1; ++m) {  // a last, short group of rows (every row without vector extensions)
        for (int64_t j = 0; j < r; ++j) {
          const T x = xa[m * r + j];
          for (int64_t c = 0; c < N; ++c) dbt[j * N + c] += x * dy[m * ld + c];
        }
      }
    }
    if (ds != nullptr) {
      for (int64_t m = t0; m < t1; ++m) {
        const int64_t s = ids[m * ids_stride];
        if (s < 0) continue;
        for (int64_t c = 0; c < N; ++c) ds[s * N + c] += dy[m * ld + c];
      }
    }
    t0 = t1;
  }
}

#undef ESTA_LOADV

#define ESTA_DY_ROWS_ARGS(T)                                                                               \
  const T *dy, int64_t ld, int64_t m0, int64_t m1, int64_t N, int64_t r, const T *bst, T *g, const T *xa, \
      T *dbt, const int64_t *ids, int64_t ids_stride, T *ds
#define ESTA_DY_ROWS_PASS dy, ld, m0, m1, N, r, bst, g, xa, dbt, ids, ids_stride, ds

#if ESTA_X86_DISPATCH
template <typename T>
__attribute__((target("avx512f"))) void dy_rows_avx512(ESTA_DY_ROWS_ARGS(T)) {
  dy_rows_impl<T, 64>(ESTA_DY_ROWS_PASS);
}
template <typename T>
__attribute__((target("avx2,fma"))) void dy_rows_avx2(ESTA_DY_ROWS_ARGS(T)) {
  dy_rows_impl<T, 32>(ESTA_DY_ROWS_PASS);
}
#endif

template <typename T>
void dy_rows(ESTA_DY_ROWS_ARGS(T)) {
#if ESTA_X86_DISPATCH
  static const int isa = cpu_vector_level();
  if (isa == 2) return dy_rows_avx512<T>(ESTA_DY_ROWS_PASS);
  if (isa == 1) return dy_rows_avx2<T>(ESTA_DY_ROWS_PASS);
#endif
  dy_rows_impl<T, 16>(ESTA_DY_ROWS_PASS);
}

// float32/float64: one parallel pass over dy (unit column stride) that writes, each when defined,
// g = scale * dy @ B (M, r), db = scale * (xa.T @ dy).T (N, r) and ds (S, N), the per-stitch sums of dy rows.
// Threads take fixed chunks of rows (their sizes depend on M only), each writing its own partial dbt and
// ds; a second short pass adds the partials in chunk order. So db and ds do not depend on the number of
// threads, and the partials stay small: at most 64 chunks of (r + S, N).
template <typename T>
void run_dy_rows(const Tensor& dy, const Tensor& bst, Tensor& g, const Tensor& xa, Tensor& db, const Tensor& ids,
                 Tensor& ds, double scale) {
  const int64_t M = dy.size(0), N = dy.size(1), ld = dy.stride(0);
  const int64_t r_g = g.defined() ? g.size(1) : 0;
  const int64_t r_b = db.defined() ? db.size(1) : 0;
  const int64_t r = std::max(r_g, r_b);
  const int64_t S = ds.defined() ? ds.size(0) : 0;
  const int64_t parts_rows = r_b + S;
  const int64_t chunk = std::max<int64_t>(1024, (M + 63) / 64 + 7) / 8 * 8;
  const int64_t n_chunks = (M + chunk - 1) / chunk;
  Tensor parts = at::empty({parts_rows > 0 ? n_chunks : 0, parts_rows, N}, dy.options());
  const T* dy_ptr = dy.const_data_ptr<T>();
  const T* bst_ptr = r_g > 0 ? bst.const_data_ptr<T>() : nullptr;
  T* g_ptr = r_g > 0 ? g.mutable_data_ptr<T>() : nullptr;
  const T* xa_ptr = r_b > 0 ? xa.const_data_ptr<T>() : nullptr;
  T* parts_ptr = parts_rows > 0 ? parts.mutable_data_ptr<T>() : nullptr;
  const int64_t* ids_ptr = S > 0 ? ids.const_data_ptr<int64_t>() : nullptr;
  const int64_t ids_stride = S > 0 && ids.numel() == M ? 1 : 0;
  parallel_blocks(n_chunks, [&](int64_t i) {
    T* part = parts_ptr == nullptr ? nullptr : parts_ptr + i * parts_rows * N;
    if (part != nullptr) std::fill(part, part + parts_rows * N, T(0));
    dy_rows<T>(dy_ptr, ld, i * chunk, std::min(M, (i + 1) * chunk), N, r, bst_ptr, g_ptr, xa_ptr,
               r_b > 0 ? part : nullptr, ids_ptr, ids_stride, S > 0 ? part + r_b * N : nullptr);
  });
  if (parts_rows == 0) return;
  // Sum the partials in chunk order, by blocks of columns.
  T* db_ptr = r_b > 0 ? db.mutable_data_ptr<T>() : nullptr;
  T* ds_ptr = S > 0 ? ds.mutable_data_ptr<T>() : nullptr;
  constexpr int64_t kCols = 256;
  parallel_blocks((N + kCols - 1) / kCols, [&](int64_t i) {
    const int64_t c0 = i * kCols, c1 = std::min(N, c0 + kCols);
    T sum[kCols];
    for (int64_t k = 0; k < parts_rows; ++k) {
      for (int64_t c = c0; c < c1; ++c) sum[c - c0] = T(0);
      for (int64_t p = 0; p < n_chunks; ++p) {
        const T* src = parts_ptr + (p * parts_rows + k) * N;
        for (int64_t c = c0; c < c1; ++c) sum[c - c0] += src[c];
      }
      if (k < r_b) {
        for (int64_t c = c0; c < c1; ++c) db_ptr[c * r_b + k] = static_cast<T>(scale) * sum[c - c0];
      } else {
        for (int64_t c = c0; c < c1; ++c) ds_ptr[(k - r_b) * N + c] = sum[c - c0];
      }
    }
  });
}

// Half types: ds (S, N) in float32, the per-stitch sums of dy rows, one pass in which every thread takes
// whole blocks of columns and walks the rows in order (so ds does not depend on the number of threads).
template <typename T>
void run_stitch_sums_half(const Tensor& dy, const Tensor& ids, Tensor& ds) {
  const int64_t M = dy.size(0), N = dy.size(1), S = ds.size(0), ld = dy.stride(0);
  const T* dy_ptr = dy.const_data_ptr<T>();
  float* ds_ptr = ds.mutable_data_ptr<float>();
  const int64_t* ids_ptr = ids.const_data_ptr<int64_t>();
  const int64_t ids_stride = ids.numel() == M ? 1 : 0;
  const int64_t cols = std::max<int64_t>(64, (N / (4 * at::get_num_threads()) + 15) / 16 * 16);
  parallel_blocks((N + cols - 1) / cols, [&](int64_t i) {
    const int64_t c0 = i * cols, c1 = std::min(N, c0 + cols);
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t c = c0; c < c1; ++c) ds_ptr[s * N + c] = 0.f;
    }
    for (int64_t m = 0; m < M; ++m) {
      const int64_t s = ids_ptr[m * ids_stride];
      if (s < 0) continue;
      for (int64_t c = c0; c < c1; ++c) ds_ptr[s * N + c] += static_cast<float>(dy_ptr[m * ld + c]);
    }
  });
}

// Reads element (i, j) of a small 1-D (i ignored) or 2-D float tensor of any supported dtype and strides.
template <typename acc_t>
struct SmallReader {
  const char* data;
  int64_t s0, s1;
  at::ScalarType dtype;
  explicit SmallReader(const Tensor& t)
      : data(static_cast<const char*>(t.const_data_ptr())),
        s0(t.dim() == 2 ? t.stride(0) : 0),
        s1(t.stride(t.dim() - 1)),
        dtype(t.scalar_type()) {}
  acc_t operator()(int64_t i, int64_t j) const {
    const int64_t k = i * s0 + j * s1;
    switch (dtype) {
      case at::kDouble: return static_cast<acc_t>(reinterpret_cast<const double*>(data)[k]);
      case at::kFloat: return static_cast<acc_t>(reinterpret_cast<const float*>(data)[k]);
      case at::kHalf: return static_cast<acc_t>(reinterpret_cast<const at::Half*>(data)[k]);
      default: return static_cast<acc_t>(reinterpret_cast<const at::BFloat16*>(data)[k]);
    }
  }
};

// table (S + 1, N) or (1, N): rows s < S hold bias + stitch_bias[s], the last row bias alone (zeros without
// a bias). A plain serial loop: the table is small, and ATen would run a parallel region for each of a
// zeros/copy_/add_ on it, each costing a scheduler time slice when the other core is busy.
template <typename acc_t>
void fill_table(Tensor& table, const c10::optional<Tensor>& bias, const Tensor& stitch_bias) {
  const int64_t rows = table.size(0), N = table.size(1);
  acc_t* out = table.mutable_data_ptr<acc_t>();
  for (int64_t n = 0; n < N; ++n) out[(rows - 1) * N + n] = acc_t(0);
  if (bias.has_value()) {
    const SmallReader<acc_t> rb(*bias);
    for (int64_t n = 0; n < N; ++n) out[(rows - 1) * N + n] = rb(0, n);
  }
  if (stitch_bias.defined()) {
    const SmallReader<acc_t> rs(stitch_bias);
    for (int64_t s = 0; s + 1 < rows; ++s) {
      for (int64_t n = 0; n < N; ++n) out[s * N + n] = rs(s, n) + out[(rows - 1) * N + n];
    }
  }
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
  Tensor table = at::empty({use_stitch ? S + 1 : 1, N}, opts.dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "esta_stitch_table", [&] {
    fill_table<scalar_t>(table, bias, use_stitch ? *stitch_bias : Tensor());
  });
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
  // d_stitch_bias is written whole by the pass over dy (or zeroed, without ids).
  Tensor ds = want_ds ? at::empty({num_stitches, N}, acc_opts) : at::empty({0}, acc_opts);

  const bool half = is_half_type(dt);
  const bool need_g = r > 0 && (want_dx || want_da);
  Tensor a = r > 0 ? lora_a->to(acc) : Tensor();
  Tensor b_scaled = r > 0 ? lora_b->to(acc) * scale : Tensor();

  const bool sum_ds = want_ds && ids.defined() && M > 0 && ds.numel() > 0;
  if (want_ds && !sum_ds) ds.zero_();
  // The passes over dy read rows with unit column stride (the autograd formula passes a contiguous dy;
  // anything else is copied once).
  auto unit_stride_dy = [&] { return grad_y.stride(1) == 1 ? grad_y : grad_y.contiguous(); };

  if (!half) {
    // One pass over dy gives g, db and ds; then dx = g @ A, onto which the big GEMM adds dy @ W (beta = 1),
    // one pass over dx fewer than adding g @ A afterwards.
    Tensor g = need_g ? at::empty({M, r}, acc_opts) : Tensor();
    Tensor db_out = want_db ? db : Tensor();
    Tensor ds_out = sum_ds ? ds : Tensor();
    if (M == 0) {
      if (want_db) db.zero_();
    } else if (need_g || want_db || sum_ds) {
      Tensor bst = need_g ? b_scaled.t().contiguous() : Tensor();
      Tensor xa = want_db ? lora_xa.contiguous() : Tensor();
      AT_DISPATCH_FLOATING_TYPES(dt, "esta_stitched_linear_dy_pass", [&] {
        run_dy_rows<scalar_t>(unit_stride_dy(), bst, g, xa, db_out, ids, ds_out, scale);
      });
    }
    if (want_dx) {
      if (need_g) {
        at::mm_out(dx, g, a);
        dx.addmm_(grad_y, weight);
      } else {
        at::mm_out(dx, grad_y, weight);
      }
    }
    if (want_da) at::mm_out(da, g.t(), x);
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
    if (sum_ds) {
      AT_DISPATCH_REDUCED_FLOATING_TYPES(dt, "esta_stitch_bias_grad", [&] {
        run_stitch_sums_half<scalar_t>(unit_stride_dy(), ids, ds);
      });
    }
  }
  return {dx, da, db, ds};
}

}  // namespace
}  // namespace esta

TORCH_LIBRARY_IMPL(esta, CPU, m) {
  m.impl("stitched_linear", &esta::stitched_linear_cpu);
  m.impl("stitched_linear_backward", &esta::stitched_linear_backward_cpu);
}
