// Schemas of the esta operators and the (empty) Python module of the extension.
// Kernels register per device in csrc/cpu/ and csrc/cuda/; fakes and autograd are registered from Python
// (esta_kernels/_ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing esta_kernels._C loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(esta, m) {
  // x (M, K), weight (N, K), bias (N,), lora_a (r, K), lora_b (N, r), stitch_bias (S, N),
  // stitch_ids int64 of M elements, or of 1 element applied to every row.
  // Returns y (M, N) in x's dtype and the LoRA intermediate x @ lora_a.T (M, r) in float32
  // (float64 for float64 inputs); (M, 0) when there is no LoRA.
  m.def(
      "stitched_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? lora_a, Tensor? lora_b, "
      "Tensor? stitch_bias, Tensor? stitch_ids, float scale) -> (Tensor, Tensor)");
  // Gradients of x, lora_a, lora_b and stitch_bias; output_mask says which to compute (an output not
  // asked for is returned empty). dx has x's dtype; the three others are float32 (float64 for float64
  // inputs), cast to their parameters' dtypes by the autograd formula.
  m.def(
      "stitched_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? lora_a, Tensor? lora_b, "
      "Tensor lora_xa, Tensor? stitch_ids, int num_stitches, float scale, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // One batch of the streaming least-squares init (esta_kernels/lstsq.py). h_in (n, d_in), h_out (n, d_out),
  // any float dtypes; shift_in (blocks, d_in), shift_out (blocks, d_out) float32 (float64 on the CPU), one row
  // per block of 1024 rows (blocks = ceil(n / 1024)), or 1-D (d,) for one shift for every row. With
  // u = h_in - shift_in[m / 1024], v = h_out - shift_out[m / 1024] for row m and ua = [u, 1], returns
  // gram = ua.T @ ua (d_in + 1, d_in + 1) and cross = ua.T @ v (d_in + 1, d_out), both float64: float32
  // products over each block, the block sums added in float64 in a fixed order.
  m.def("lstsq_accumulate(Tensor h_in, Tensor h_out, Tensor shift_in, Tensor shift_out) -> (Tensor, Tensor)");
}
