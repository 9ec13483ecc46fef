#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul", &qmatmul, "x @ dequantize(w).T with 16-bit activations (AVX2)");
  m.def("quantize_activations", &quantize_activations,
        "the 16-bit activation runs (q, d, d * sum(q)) the integer kernels multiply");
  m.def("prefill_matmul", &prefill_matmul,
        "x @ dequantize(w).T in float32, dequantizing a few rows at a time (pre-fill)");
  m.def("dequantize", &dequantize,
        "dequantize Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K/F16/BF16 rows to float32");
  m.def("repack_k", &repack_k, "Q4_K/Q5_K/Q6_K rows -> their x8 layout (eight rows in the lanes)");
  m.def("prefetch_bytes", &prefetch_bytes, "how far ahead the matmuls prefetch weights (bytes)");
  m.def("set_prefetch_bytes", &set_prefetch_bytes, "set the prefetch distance (0 = off)");
  m.def("stream_read", &stream_read, "read a uint8 buffer once, in parallel (bandwidth probe)");
  m.attr("isa") = MISTRAL7B_ISA;
  // module_local: builds for several ISAs can be loaded in one process (tests compare them)
  py::class_<DecodeModel>(m, "DecodeModel",
                          "one model's weights for decode steps, token ids to logits (decode.cpp)",
                          py::module_local())
      .def(py::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<int64_t>,
                    torch::Tensor, int64_t, torch::Tensor, torch::Tensor, int64_t, int64_t,
                    int64_t, int64_t, double, std::vector<int64_t>>(),
           py::arg("norms"), py::arg("weights"), py::arg("types"), py::arg("embedding"),
           py::arg("embedding_type"), py::arg("final_norm"), py::arg("head"),
           py::arg("head_type"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"),
           py::arg("eps"), py::arg("parts") = std::vector<int64_t>{})
      .def("step", &DecodeModel::step, "one new token per sequence; (B, vocab) logits");
}
