// Quantized matrix multiplication on CPU with AVX2: y = x @ W^T where W stays in its GGUF
// block format (Q8_0, Q4_0, Q4_1). Built by mistral7b/quant/kernels.py with
// torch.utils.cpp_extension; when it cannot be built, or the CPU lacks AVX2, the PyTorch
// fallback in kernels.py is used instead.
//
// Each row of x is quantized to 16-bit blocks of 32 values (int16 q, float scale d, and
// s = d * sum(q)), so a weight block times an activation block is an integer dot product
// (_mm256_madd_epi16), scaled once per block. llama.cpp quantizes activations to 8 bits instead;
// we measured that to move SmolLM2's logits by ~1.0 (greedy text diverged from the float path
// within a few tokens), while 16 bits keep them within ~1e-2 at nearly the same speed.
//
// GGUF block layouts (32 weights per block):
//   Q8_0: f16 d, int8 q[32]                  w = d * q
//   Q4_0: f16 d, u8 qs[16]                   w = d * (q - 8)
//   Q4_1: f16 d, f16 m, u8 qs[16]            w = d * q + m
// where weight j < 16 is the low nibble of qs[j] and weight j + 16 its high nibble.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QK = 32;

enum QType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8 };  // ggml type ids

int64_t block_bytes(int64_t type) {
  switch (type) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q8_0: return 34;
  }
  TORCH_CHECK(false, "qmatmul: unsupported ggml type ", type);
}

struct XBlock {     // one quantized block of an activation row
  int16_t q[QK];
  float d;          // scale
  float s;          // d * sum(q)
};

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

void quantize_row(const float* x, XBlock* out, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; b++) {
    const float* v = x + b * QK;
    float amax = 0.f;
    for (int i = 0; i < QK; i++) amax = std::max(amax, std::fabs(v[i]));
    const float d = amax / 32767.f;
    const float id = d > 0.f ? 1.f / d : 0.f;
    int32_t sum = 0;
    for (int i = 0; i < QK; i++) {
      const int q = static_cast<int>(std::nearbyint(v[i] * id));
      out[b].q[i] = static_cast<int16_t>(q);
      sum += q;
    }
    out[b].d = d;
    out[b].s = d * static_cast<float>(sum);
  }
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// sum over 32 weights of w[i] * x[i], w given as two halves of 16 int16 lanes, as 8 float
// partial sums.
inline __m256 dot_i16(__m256i w_lo, __m256i w_hi, const XBlock& xb) {
  const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.q));
  const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.q + 16));
  const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(w_lo, x_lo), _mm256_madd_epi16(w_hi, x_hi));
  return _mm256_cvtepi32_ps(sum);
}

// 16 bytes of nibbles -> weights 0..15 (low nibbles) and 16..31 (high nibbles) as int16.
inline void unpack_nibbles(const uint8_t* qs, __m256i& lo, __m256i& hi) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  lo = _mm256_cvtepu8_epi16(_mm_and_si128(packed, mask));
  hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), mask));
}

// Dot product of one weight row with one quantized activation row. Templated on the format so
// each loop is branch-free; two accumulators hide the FMA latency.
template <int64_t TYPE>
inline float dot_row(const uint8_t* row, const XBlock* x, int64_t n_blocks) {
  constexpr int64_t BB = TYPE == Q8_0 ? 34 : TYPE == Q4_0 ? 18 : 20;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  float extra = 0.f;
  for (int64_t b = 0; b < n_blocks; b++) {
    const uint8_t* blk = row + b * BB;
    const XBlock& xb = x[b];
    const float d = half_to_float(blk);
    __m256i lo, hi;
    if constexpr (TYPE == Q8_0) {
      lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
      hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)));
    } else if constexpr (TYPE == Q4_0) {
      unpack_nibbles(blk + 2, lo, hi);
      extra -= 8.f * d * xb.s;  // the "- 8" of every weight, times sum(x)
    } else {
      unpack_nibbles(blk + 4, lo, hi);
      extra += half_to_float(blk + 2) * xb.s;  // the "+ m" of every weight, times sum(x)
    }
    const __m256 p = dot_i16(lo, hi, xb);
    if (b & 1) {
      acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), p, acc1);
    } else {
      acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), p, acc0);
    }
  }
  return hsum(_mm256_add_ps(acc0, acc1)) + extra;
}

// y[m, n] for rows n in [n0, n1) of W and all M rows of x. The weight row stays in L1 while
// every activation row passes over it.
template <int64_t TYPE>
void rows_kernel(const uint8_t* w, int64_t row_bytes, int64_t n_blocks, const XBlock* xq,
                 int64_t M, float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t m = 0; m < M; m++) y[m * N + n] = dot_row<TYPE>(row, xq + m * n_blocks, n_blocks);
  }
}

}  // namespace

// x: (M, K) float32 contiguous; w: (N, row_bytes) uint8; returns (M, N) float32.
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor w, int64_t type) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "qmatmul: x must be 2-D fp32");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8, "qmatmul: w must be 2-D uint8");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % QK == 0, "qmatmul: K must be a multiple of 32, got ", K);
  const int64_t n_blocks = K / QK;
  const int64_t row_bytes = w.size(1);
  TORCH_CHECK(row_bytes == n_blocks * block_bytes(type), "qmatmul: weight row has ", row_bytes,
              " bytes, expected ", n_blocks * block_bytes(type), " for K = ", K);
  std::vector<XBlock> xq(M * n_blocks);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++) quantize_row(xp + m * K, xq.data() + m * n_blocks, n_blocks);
  });
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    switch (type) {
      case Q8_0: rows_kernel<Q8_0>(wp, row_bytes, n_blocks, xq.data(), M, yp, N, n0, n1); break;
      case Q4_0: rows_kernel<Q4_0>(wp, row_bytes, n_blocks, xq.data(), M, yp, N, n0, n1); break;
      default: rows_kernel<Q4_1>(wp, row_bytes, n_blocks, xq.data(), M, yp, N, n0, n1); break;
    }
  });
  return y;
}

// Dequantize rows: w (N, row_bytes) uint8 -> (N, K) float32.
torch::Tensor dequantize(torch::Tensor w, int64_t type) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8, "dequantize: w must be 2-D uint8");
  w = w.contiguous();
  const int64_t N = w.size(0), row_bytes = w.size(1), bb = block_bytes(type);
  TORCH_CHECK(row_bytes % bb == 0, "dequantize: row of ", row_bytes, " bytes is not whole blocks");
  const int64_t n_blocks = row_bytes / bb, K = n_blocks * QK;
  auto out = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      for (int64_t b = 0; b < n_blocks; b++) {
        const uint8_t* blk = wp + n * row_bytes + b * bb;
        float* o = op + n * K + b * QK;
        const float d = half_to_float(blk);
        if (type == Q8_0) {
          for (int i = 0; i < QK; i++) o[i] = d * static_cast<int8_t>(blk[2 + i]);
        } else {
          const float mn = type == Q4_1 ? half_to_float(blk + 2) : -8.f * d;
          const uint8_t* qs = blk + (type == Q4_1 ? 4 : 2);
          for (int i = 0; i < QK / 2; i++) {
            o[i] = d * (qs[i] & 0x0F) + mn;
            o[i + QK / 2] = d * (qs[i] >> 4) + mn;
          }
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul", &qmatmul, "x @ dequantize(w).T with 8-bit activations (AVX2)");
  m.def("dequantize", &dequantize, "dequantize Q8_0/Q4_0/Q4_1 rows to float32");
}
