// CPU kernel of esta::lstsq_accumulate (schema in esta_kernels/_ext.py): one batch of the streaming least-squares
// stitching init.
//
//   u = h_in - shift_in[b], v = h_out - shift_out[b] for the rows of block b, ua = [u, 1]
//   gram = ua.T @ ua (d_in + 1, d_in + 1), cross = ua.T @ v (d_in + 1, d_out), both float64
//
// The batch is cut into blocks of 1024 rows (the last one shorter); block b is centred by row b of a 2-D
// shift ((blocks, d)), or by the one shift of a 1-D one. Each block is written once into a float32 buffer
// [u, 1, v] (centred by its shift, converted from any input dtype and strides by one copy). BLAS GEMMs then
// give its [gram | cross] = ua.T @ [ua, v], the ones column supplying the row sums; by row chunks of 128
// columns of ua, each chunk multiplying only the columns from its own first one on, so about half of the
// Gram's lower triangle is never computed (a syrk in pieces; the upper triangle is mirrored at the end).
// The block results are added into a float64 total in block order, so the result is deterministic and
// its rounding is that of float32 sums over at most 1024 rows (see esta_kernels/lstsq.py for the error
// analysis). Float64 inputs take the same path in float64. Memory: one block buffer and one block
// result, whatever n is. The GEMMs are multi-threaded by the BLAS, the centring copy by ATen's kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

namespace esta {
namespace {

using at::Tensor;

constexpr int64_t kBlockRows = 1024;
// Columns of ua per GEMM of the chunked (upper-triangle) Gram: small enough to skip most of the lower
// triangle, large enough for the BLAS to run at full speed.
constexpr int64_t kGramChunk = 128;

std::string lstsq_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(t);
  }
}

bool is_float_input(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_lstsq_args(const Tensor& h_in, const Tensor& h_out, const Tensor& shift_in, const Tensor& shift_out) {
  constexpr const char* op = "lstsq_accumulate";
  const std::pair<const char*, const Tensor*> all[] = {
      {"h_in", &h_in}, {"h_out", &h_out}, {"shift_in", &shift_in}, {"shift_out", &shift_out}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor for the cpu backend, got a tensor on ",
                      t->device());
  }
  TORCH_CHECK_TYPE(is_float_input(h_in.scalar_type()), op, ": h_in must be float32, float16, bfloat16 or float64, got ",
                   lstsq_dtype_name(h_in.scalar_type()));
  TORCH_CHECK_TYPE(is_float_input(h_out.scalar_type()), op,
                   ": h_out must be float32, float16, bfloat16 or float64, got ", lstsq_dtype_name(h_out.scalar_type()));
  TORCH_CHECK_TYPE(shift_in.scalar_type() == at::kFloat || shift_in.scalar_type() == at::kDouble, op,
                   ": shift_in must be float32 (or float64), got ", lstsq_dtype_name(shift_in.scalar_type()));
  TORCH_CHECK_TYPE(shift_out.scalar_type() == at::kFloat || shift_out.scalar_type() == at::kDouble, op,
                   ": shift_out must be float32 (or float64), got ", lstsq_dtype_name(shift_out.scalar_type()));
  TORCH_CHECK_VALUE(h_in.dim() == 2, op, ": h_in must be 2-D (n, d_in), got shape ", h_in.sizes());
  TORCH_CHECK_VALUE(h_out.dim() == 2, op, ": h_out must be 2-D (n, d_out), got shape ", h_out.sizes());
  TORCH_CHECK_VALUE(h_in.size(0) == h_out.size(0), op, ": h_in and h_out must have the same number of rows, got ",
                    h_in.size(0), " and ", h_out.size(0));
  TORCH_CHECK_VALUE(h_in.size(1) >= 1, op, ": h_in must have at least one feature (d_in >= 1), got shape ",
                    h_in.sizes());
  TORCH_CHECK_VALUE(h_out.size(1) >= 1, op, ": h_out must have at least one feature (d_out >= 1), got shape ",
                    h_out.sizes());
  const int64_t blocks = (h_in.size(0) + kBlockRows - 1) / kBlockRows;
  TORCH_CHECK_VALUE((shift_in.dim() == 1 && shift_in.size(0) == h_in.size(1)) ||
                        (shift_in.dim() == 2 && shift_in.size(0) == blocks && shift_in.size(1) == h_in.size(1)),
                    op, ": shift_in must have shape (", h_in.size(1), ",) or (", blocks, ", ", h_in.size(1),
                    ") (one row per block of ", kBlockRows, " rows of h_in), got ", shift_in.sizes());
  TORCH_CHECK_VALUE((shift_out.dim() == 1 && shift_out.size(0) == h_out.size(1)) ||
                        (shift_out.dim() == 2 && shift_out.size(0) == blocks && shift_out.size(1) == h_out.size(1)),
                    op, ": shift_out must have shape (", h_out.size(1), ",) or (", blocks, ", ", h_out.size(1),
                    ") (one row per block of ", kBlockRows, " rows of h_out), got ", shift_out.sizes());
}

std::tuple<Tensor, Tensor> lstsq_accumulate_cpu(const Tensor& h_in, const Tensor& h_out, const Tensor& shift_in,
                                                const Tensor& shift_out) {
  check_lstsq_args(h_in, h_out, shift_in, shift_out);
  const int64_t n = h_in.size(0), d_in = h_in.size(1), d_out = h_out.size(1);
  const int64_t da = d_in + 1;
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  Tensor gram = at::zeros({da, da}, f64);
  Tensor cross = at::zeros({da, d_out}, f64);
  if (n > 0) {
    // float64 only when an input is float64: its values do not fit float32 exactly.
    const bool wide = h_in.scalar_type() == at::kDouble || h_out.scalar_type() == at::kDouble;
    const auto acc = at::TensorOptions().dtype(wide ? at::kDouble : at::kFloat);
    const Tensor s_in = shift_in.to(acc.dtype());
    const Tensor s_out = shift_out.to(acc.dtype());
    const int64_t rows_max = std::min(n, kBlockRows);
    Tensor buf = at::empty({rows_max, da + d_out}, acc);
    Tensor part = at::empty({std::min(da, kGramChunk) * (da + d_out)}, acc);
    buf.narrow(1, d_in, 1).fill_(1);  // the ones column: never overwritten below
    for (int64_t r0 = 0; r0 < n; r0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, n - r0);
      Tensor b = buf.narrow(0, 0, rows);
      // One pass per input: convert (any dtype, any strides) and centre, into the block buffer.
      Tensor u = b.narrow(1, 0, d_in);
      Tensor v = b.narrow(1, da, d_out);
      const int64_t block = r0 / kBlockRows;
      at::sub_out(u, h_in.narrow(0, r0, rows), s_in.dim() == 2 ? s_in[block] : s_in);
      at::sub_out(v, h_out.narrow(0, r0, rows), s_out.dim() == 2 ? s_out[block] : s_out);
      // The Gram is symmetric: row chunk [j0, j1) of [gram | cross] needs only the columns from j0 on,
      // which skips about half of the Gram's products (a syrk in pieces; mirrored below).
      for (int64_t j0 = 0; j0 < da; j0 += kGramChunk) {
        const int64_t rows_j = std::min(kGramChunk, da - j0);
        const int64_t cols = da + d_out - j0;
        Tensor out = part.narrow(0, 0, rows_j * cols).view({rows_j, cols});
        at::mm_out(out, b.narrow(1, j0, rows_j).t(), b.narrow(1, j0, cols));
        // float64 sums, in block order
        gram.narrow(0, j0, rows_j).narrow(1, j0, da - j0).add_(out.narrow(1, 0, da - j0));
        cross.narrow(0, j0, rows_j).add_(out.narrow(1, da - j0, d_out));
      }
    }
    // Mirror the upper triangle (the diagonal chunks also summed part of the lower one, overwritten here).
    double* g = gram.data_ptr<double>();
    for (int64_t i = 0; i < da; ++i) {
      for (int64_t j = i + 1; j < da; ++j) g[j * da + i] = g[i * da + j];
    }
  }
  return std::make_tuple(gram, cross);
}

}  // namespace
}  // namespace esta

TORCH_LIBRARY_IMPL(esta, CPU, m) {
  m.impl("lstsq_accumulate", &esta::lstsq_accumulate_cpu);
}
