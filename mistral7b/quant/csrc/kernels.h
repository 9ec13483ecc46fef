// What the C++ files of the extension share. qmatmul.cpp: the quantized matmul and dequantize
// kernels; prefill.cpp: the float32 matmul for many rows (pre-fill); decode.cpp: one whole
// decode step; bindings.cpp: the Python module.
#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <cstdint>
#include <vector>

// The instruction set this build was compiled for (kernels.py builds one per ISA level and
// loads the best the CPU has): "avx2", "avxvnni" or "avx512vnni".
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define MISTRAL7B_ISA "avx512vnni"
#elif defined(__AVXVNNI__)
#define MISTRAL7B_ISA "avxvnni"
#else
#define MISTRAL7B_ISA "avx2"
#endif

// acc + madd(a, b): each int32 lane of acc plus the two int16 products of that lane, wrapping
// like the add. VNNI does it in one instruction (vpdpwssd); the result is the same integer.
inline __m256i madd_add(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// The sum of the 8 floats of v.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The sum of the 8 int32 of v.
inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x01));
  return _mm_cvtsi128_si32(s);
}

// How far ahead of the weight row being read the matmuls prefetch, in bytes (0 = off). The
// default was measured with benchmarks/kernels.py (see BENCHMARKS.md).
constexpr int64_t kDefaultPrefetchBytes = 4096;
int64_t prefetch_bytes();
void set_prefetch_bytes(int64_t bytes);

// Reads every byte of buf once, in parallel (the machine's read bandwidth, for benchmarks);
// returns a checksum so the reads are not optimised away.
int64_t stream_read(torch::Tensor buf);

// y (M, N) = x (M, K) @ dequantize(w).T, with w N rows of row_bytes bytes in ggml `type`.
void qmatmul_into(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N,
                  int64_t row_bytes, int64_t type, float* y);

// Checks that w is a contiguous (N, row_bytes) uint8 tensor holding rows of K values of `type`.
void check_weight(const torch::Tensor& w, int64_t K, int64_t type, const char* what);

// Rows [n0, n1) of w (rows of row_bytes bytes holding K values of `type`) as float32, row n0
// at out, row n at out + (n - n0) * K.
void dequantize_rows_into(const uint8_t* w, int64_t row_bytes, int64_t type, int64_t K,
                          int64_t n0, int64_t n1, float* out);

// x (M, K) float32 and w (N, row_bytes) uint8 in ggml `type`, checked (errors name `what`);
// returns y (M, N) float32 filled by `into`.
using MatmulInto = void (*)(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N,
                            int64_t row_bytes, int64_t type, float* y);
torch::Tensor matmul_tensor(torch::Tensor x, torch::Tensor w, int64_t type, const char* what,
                            MatmulInto into);

torch::Tensor qmatmul(torch::Tensor x, torch::Tensor w, int64_t type);

// The integer kernels' view of activations x (M, K): each run of 32 values as int16 q
// (M, K), scale d and d * sum(q) (M, K / 32) (for tests).
std::vector<torch::Tensor> quantize_activations(torch::Tensor x);

// prefill.cpp: y (M, N) = x (M, K) @ dequantize(w).T in float32, for many rows of x.
void prefill_matmul_into(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N,
                         int64_t row_bytes, int64_t type, float* y);
torch::Tensor prefill_matmul(torch::Tensor x, torch::Tensor w, int64_t type);
torch::Tensor dequantize(torch::Tensor w, int64_t type);
torch::Tensor repack_k(torch::Tensor raw, int64_t type);

// decode.cpp: one whole decode step (token ids to logits) for one new token per sequence. A
// DecodeModel holds one model's weights, checked once; step runs them over a rolling cache.
// Each layer has 4 projections (wqkv, wo, w13, w2); parts[p] (default: 1 each) says how many
// of `weights` projection p stacks by rows (a file's wq, wk, wv in different formats).
class DecodeModel {
 public:
  DecodeModel(std::vector<torch::Tensor> norms, std::vector<torch::Tensor> weights,
              std::vector<int64_t> types, torch::Tensor embedding, int64_t embedding_type,
              torch::Tensor final_norm, torch::Tensor head, int64_t head_type, int64_t n_heads,
              int64_t n_kv_heads, int64_t head_dim, double eps,
              const std::vector<int64_t>& parts = {});
  torch::Tensor step(torch::Tensor tokens, const std::vector<int64_t>& rows,
                     const std::vector<int64_t>& starts, const std::vector<int64_t>& n_new,
                     int64_t window, torch::Tensor rope, const std::vector<int64_t>& rope_rows,
                     torch::Tensor k_cache, torch::Tensor v_cache) const;

 private:
  std::vector<torch::Tensor> norms_, weights_;   // per layer: 2 norms; wqkv, wo, w13, w2
  std::vector<int64_t> types_;                   // the weights' ggml types
  std::vector<int64_t> first_;                   // projection p: weights_[first_[p] ..
                                                 // first_[p + 1]), stacked by rows
  torch::Tensor embedding_;
  int64_t embedding_type_;
  torch::Tensor final_norm_, head_;
  int64_t head_type_, n_heads_, n_kv_heads_, head_dim_;
  double eps_;
};
