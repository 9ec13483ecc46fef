// Quantized matrix multiplication on CPU with AVX2: y = x @ W^T where W stays in its GGUF
// block format (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K). Built by mistral7b/quant/kernels.py with
// torch.utils.cpp_extension; when it cannot be built, or the CPU lacks AVX2, the PyTorch
// fallback in kernels.py is used instead.
//
// Each row of x is quantized to 16-bit runs of 32 values (int16 q, float scale d, and
// s = d * sum(q)), so 32 weights times an activation run is an integer dot product
// (_mm256_madd_epi16), scaled once per 32 values. llama.cpp quantizes activations to 8 bits
// instead; we measured that to move SmolLM2's logits by ~1.0 (greedy text diverged from the
// float path within a few tokens), while 16 bits keep them within ~1e-2 at nearly the same speed.
//
// GGUF block layouts, 32 weights per block:
//   Q8_0: f16 d, int8 q[32]                  w = d * q
//   Q4_0: f16 d, u8 qs[16]                   w = d * (q - 8)
//   Q4_1: f16 d, f16 m, u8 qs[16]            w = d * q + m
// where weight j < 16 is the low nibble of qs[j] and weight j + 16 its high nibble.
//
// K-quants, 256 weights per block:
//   Q4_K (144 bytes): f16 d, f16 dmin, u8 scales[12], u8 qs[128]
//     8 sub-blocks of 32, each with a 6-bit scale sc[j] and a 6-bit min m[j] packed in
//     `scales`: bytes 0-3 hold sc[0..3] in their low 6 bits and bytes 4-7 m[0..3]; for
//     sub-blocks 4..7, bytes 8-11 hold the low 4 bits (sc: low nibble, m: high nibble) and the
//     top 2 bits of bytes 0-3 (sc) and 4-7 (m) the high 2 bits.
//     Sub-block 2c is the low nibbles of qs[32c .. 32c+31], sub-block 2c+1 their high nibbles.
//     w = (d * sc[j]) * q - dmin * m[j]
//   Q5_K (176 bytes): f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128]
//     as Q4_K, and weight i of sub-block j has bit j of qh[i] as its fifth bit (value 16).
//   Q6_K (210 bytes): u8 ql[128], u8 qh[64], int8 scales[16], f16 d
//     two halves of 128 weights; in half h, weight 32k + i (k < 4, i < 32) is
//       nibble (k / 2) of ql[64h + 32 (k % 2) + i] | (bits 2k, 2k+1 of qh[32h + i]) << 4,
//     minus 32, and weight v of the block has scale scales[v / 16]:
//     w = (d * scales[v / 16]) * (q - 32)
// The products in these formulas are exact in float32 (few significant bits), so the
// dequantized values below equal gguf's NumPy reference bit for bit.
//
// Streaming weights from memory. A decode step reads every weight once, so the matmuls wait on
// memory, not on arithmetic. The loops run ~20 instructions per 20-byte Q4_1 block, so the
// out-of-order window reaches only a few cache lines ahead: on a VM with ~270 ns memory
// latency that alone capped one core near 1.7 GB/s. Each thread therefore prefetches the
// weight bytes `prefetch_bytes()` ahead of the row it reads (a constant distance in bytes,
// whatever the row size), issued once per row at its top. Prefetching changes no arithmetic:
// results are bit-identical at every distance (tests/test_quant.py checks).
//
// For the K-quants each weight row is dotted run by run: a run of 32 weights is unpacked to
// bytes, widened to int16 with unpacklo/unpackhi (which interleave 8-value groups, so the
// activation run is stored in that same order), multiplied with madd, converted once to float
// and scaled by d * sc[j] * x.d[j]. The mins (Q4_K, Q5_K) and the -32 offset (Q6_K) do not
// depend on each weight, so they are applied once per block through the sums of x.

#include "kernels.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

std::atomic<int64_t> g_prefetch_bytes{kDefaultPrefetchBytes};

// Prefetch the cache lines of [p, p + bytes) into L1 (T0: it is read within a few rows).
inline void prefetch_lines(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(p + off), _MM_HINT_T0);
  }
}

// Called at the top of row n of a thread's rows [.., end): prefetches the bytes that lie
// `distance` bytes past this row's, as far as the thread's own rows go. At the first row of a
// range it also prefetches the first `distance` bytes, so that the stream starts ahead.
inline void prefetch_ahead(const uint8_t* row, int64_t row_bytes, const uint8_t* end,
                           int64_t distance, bool first) {
  if (distance <= 0) return;
  const uint8_t* from = first ? row : row + distance;
  const uint8_t* to = std::min(row + distance + row_bytes, end);
  if (from < to) prefetch_lines(from, to - from);
}

constexpr int64_t QK = 32;     // values per activation run, and per Q8_0/Q4_0/Q4_1 block
constexpr int64_t QK_K = 256;  // values per K-quant block

// ggml ids; F16 and BF16 are 16-bit floats (one value per "block"), multiplied in float32.
enum QType : int64_t {
  F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
  // Ours, not ggml's: the same blocks repacked eight rows at a time (see "x8" below).
  X8 = 1000, Q4_0_X8 = X8 + Q4_0, Q4_1_X8 = X8 + Q4_1, Q8_0_X8 = X8 + Q8_0, Q4_K_X8 = X8 + Q4_K,
  Q5_K_X8 = X8 + Q5_K, Q6_K_X8 = X8 + Q6_K
};

bool is_x8(int64_t type) {
  return type == Q4_0_X8 || type == Q4_1_X8 || type == Q8_0_X8 || type == Q4_K_X8 ||
         type == Q5_K_X8 || type == Q6_K_X8;
}

template <int64_t T>
constexpr int64_t kBlockBytes = T == Q8_0 ? 34 : T == Q4_0 ? 18 : T == Q4_1 ? 20
                              : T == Q4_K ? 144 : T == Q5_K ? 176 : 210;

// Bytes of the eight rows' scales (and Q4_1's mins) before the weights of a 32-value x8 block.
template <int64_t T>
constexpr int64_t kX8Head = T == Q4_1 ? 32 : 16;

bool is_k_quant(int64_t type) { return type == Q4_K || type == Q5_K || type == Q6_K; }

int64_t block_bytes(int64_t type) {
  if (is_x8(type)) type -= X8;
  switch (type) {
    case Q4_0: return kBlockBytes<Q4_0>;
    case Q4_1: return kBlockBytes<Q4_1>;
    case Q8_0: return kBlockBytes<Q8_0>;
    case Q4_K: return kBlockBytes<Q4_K>;
    case Q5_K: return kBlockBytes<Q5_K>;
    case Q6_K: return kBlockBytes<Q6_K>;
    case F16: case BF16: return 2;
  }
  TORCH_CHECK(false, "qmatmul: unsupported ggml type ", type);
}

bool is_half(int64_t type) { return type == F16 || type == BF16; }

int64_t block_values(int64_t type) {
  if (is_x8(type)) type -= X8;
  return is_k_quant(type) ? QK_K : is_half(type) ? 1 : QK;
}

struct XBlock {     // one quantized run of an activation row, for the 32-value formats
  int16_t q[QK];
  float d;          // scale
  float s;          // d * sum(q)
};

struct XSuper {     // 256 values of an activation row, for the K-quants: 8 runs of 32
  int16_t q[QK_K];  // run j at q + 32j, in the order of kUnpackSlot
  float d[8];       // scale of each run
  float s[8];       // d * sum(q) of each run
  float h[16];      // d * sum(q) of each 16 values (Q6_K has a scale per 16 weights)
};

// Where value i of a run sits in XSuper::q: the order _mm256_unpacklo_epi8 (values 0-7 and
// 16-23) and _mm256_unpackhi_epi8 (8-15 and 24-31) produce from 32 weight bytes.
constexpr int kUnpackSlot(int i) { return i < 8 || i >= 24 ? i : i < 16 ? i + 8 : i - 8; }

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i load256(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// Quantizes 32 values to int16 at q[slot(i)]; returns the scale, and the sums of the integers
// of values 0-15 and 16-31. q = round-to-nearest-even(v / d), d = max |v| / 32767: the
// conversion rounds in the default MXCSR mode, as std::nearbyint does (the scalar loop this
// replaced took ~100 ns a run, ~5% of a default-model decode step).
template <bool UNPACK_ORDER>
inline float quantize_run(const float* v, int16_t* q, int32_t sums[2]) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 x[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; i++) {
    x[i] = _mm256_loadu_ps(v + 8 * i);
    amax = _mm256_max_ps(_mm256_and_ps(x[i], abs_mask), amax);   // a NaN value is skipped
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float d = _mm_cvtss_f32(m4) / 32767.f;
  const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
  __m256i n[4];
  for (int i = 0; i < 4; i++) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(x[i], id));
  sums[0] = hsum_i32(_mm256_add_epi32(n[0], n[1]));
  sums[1] = hsum_i32(_mm256_add_epi32(n[2], n[3]));
  // packs interleaves 128-bit halves: packs(a, b) = a0-3 b0-3 a4-7 b4-7; 0xD8 restores order.
  // Natural order packs values 0-7 with 8-15; the unpack order 0-7 with 16-23 (kUnpackSlot).
  const int i1 = UNPACK_ORDER ? 2 : 1, i2 = UNPACK_ORDER ? 1 : 2;
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permute4x64_epi64(_mm256_packs_epi32(n[0], n[i1]), 0xD8));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16),
                      _mm256_permute4x64_epi64(_mm256_packs_epi32(n[i2], n[3]), 0xD8));
  return d;
}

void quantize_row(const float* x, XBlock* out, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; b++) {
    int32_t sums[2];
    const float d = quantize_run<false>(x + b * QK, out[b].q, sums);
    out[b].d = d;
    out[b].s = d * static_cast<float>(sums[0] + sums[1]);
  }
}

void quantize_row_k(const float* x, XSuper* out, int64_t n_super) {
  for (int64_t b = 0; b < n_super; b++) {
    for (int j = 0; j < 8; j++) {
      int32_t sums[2];
      const float d = quantize_run<true>(x + b * QK_K + j * QK, out[b].q + j * QK, sums);
      out[b].d[j] = d;
      out[b].s[j] = d * static_cast<float>(sums[0] + sums[1]);
      out[b].h[2 * j] = d * static_cast<float>(sums[0]);
      out[b].h[2 * j + 1] = d * static_cast<float>(sums[1]);
    }
  }
}

// sum over 32 weights of w[i] * x[i], w given as two halves of 16 int16 lanes, as 8 float
// partial sums.
inline __m256 dot_i16(__m256i w_lo, __m256i w_hi, const int16_t* xq) {
  const __m256i x_lo = load256(xq);
  const __m256i x_hi = load256(xq + 16);
  const __m256i sum = madd_add(_mm256_madd_epi16(w_lo, x_lo), w_hi, x_hi);
  return _mm256_cvtepi32_ps(sum);
}

// 16 bytes of nibbles -> weights 0..15 (low nibbles) and 16..31 (high nibbles) as int16.
// Widening the bytes first makes each 16-bit lane hold one byte (< 256): its low nibble is an
// AND away, its high nibble a shift away, with no mask after the shift (3 instructions after
// the load, against 5 when splitting the nibbles before widening).
inline void unpack_nibbles(const uint8_t* qs, __m256i& lo, __m256i& hi) {
  const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  lo = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
  hi = _mm256_srli_epi16(bytes, 4);
}

// ---- K-quants ------------------------------------------------------------------------------

// Q4_K/Q5_K: the 8 six-bit scales and mins packed in 12 bytes (layout in the header comment),
// as 8 bytes each, computed four sub-blocks at a time in 32-bit words.
inline void unpack_scales_mins(const uint8_t* p, uint64_t& sc, uint64_t& mn) {
  uint32_t w[3];
  std::memcpy(w, p, 12);
  const uint32_t low6 = 0x3F3F3F3Fu, low4 = 0x0F0F0F0Fu, bits45 = 0x30303030u;
  const uint32_t sc_lo = w[0] & low6, mn_lo = w[1] & low6;
  const uint32_t sc_hi = (w[2] & low4) | ((w[0] >> 2) & bits45);
  const uint32_t mn_hi = ((w[2] >> 4) & low4) | ((w[1] >> 2) & bits45);
  sc = sc_lo | static_cast<uint64_t>(sc_hi) << 32;
  mn = mn_lo | static_cast<uint64_t>(mn_hi) << 32;
}

inline __m256 bytes_to_floats(uint64_t bytes) {  // 8 unsigned bytes -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(bytes))));
}

// Calls f(j, q) for the eight runs j of 32 consecutive weights of one K-quant block, q holding
// their unsigned integer values as 32 bytes: 0..15 (Q4_K), 0..31 (Q5_K) or 0..63 (Q6_K, before
// the -32). The shifts work on 16-bit lanes; each one below moves the bits it keeps only
// within their own byte.
template <int64_t T, class F>
inline void for_each_run(const uint8_t* blk, F&& f) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  if constexpr (T == Q4_K || T == Q5_K) {
    const uint8_t* qs = blk + (T == Q4_K ? 16 : 48);
    [[maybe_unused]] const __m256i qh = T == Q5_K ? load256(blk + 16) : _mm256_setzero_si256();
    [[maybe_unused]] const __m256i bit4 = _mm256_set1_epi8(0x10);
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++) {
      const __m256i v = load256(qs + 32 * c);
      __m256i lo = _mm256_and_si256(v, m4);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      if constexpr (T == Q5_K) {  // bit j of every qh byte to bit 4, j = 2c (lo), 2c + 1 (hi)
        const int j = 2 * c;
        const __m256i h_lo = j <= 4 ? _mm256_slli_epi16(qh, 4 - j) : _mm256_srli_epi16(qh, j - 4);
        const __m256i h_hi = j + 1 <= 4 ? _mm256_slli_epi16(qh, 3 - j)
                                        : _mm256_srli_epi16(qh, j - 3);
        lo = _mm256_or_si256(lo, _mm256_and_si256(h_lo, bit4));
        hi = _mm256_or_si256(hi, _mm256_and_si256(h_hi, bit4));
      }
      f(2 * c, lo);
      f(2 * c + 1, hi);
    }
  } else {  // Q6_K
    const __m256i bits45 = _mm256_set1_epi8(0x30);
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
      const __m256i a = load256(blk + 64 * h), b = load256(blk + 64 * h + 32);
      const __m256i qh = load256(blk + 128 + 32 * h);
      const auto emit = [&](int k, __m256i low, __m256i high) {
        f(4 * h + k, _mm256_or_si256(_mm256_and_si256(low, m4), _mm256_and_si256(high, bits45)));
      };
      emit(0, a, _mm256_slli_epi16(qh, 4));                       // qh bits 0-1
      emit(1, b, _mm256_slli_epi16(qh, 2));                       // qh bits 2-3
      emit(2, _mm256_srli_epi16(a, 4), qh);                       // qh bits 4-5
      emit(3, _mm256_srli_epi16(b, 4), _mm256_srli_epi16(qh, 2)); // qh bits 6-7
    }
  }
}

// One K-quant block of a weight row dotted with the matching 256 activations: adds the scaled
// integer products to acc0/acc1 (alternating runs, to hide the FMA latency), and to sub what
// is to be subtracted from the result (the mins, or Q6_K's offset of 32).
template <int64_t T>
inline void dot_k_block(const uint8_t* blk, const XSuper& x, __m256& acc0, __m256& acc1,
                        __m256& sub) {
  const __m256i zero = _mm256_setzero_si256();
  __m256 factor;  // run j: d * (scale of the sub-block, Q4_K/Q5_K) * x.d[j]
  __m256i sc16 = zero;  // Q6_K: int16 scales; sub-blocks 0, 2, .., 14 low, 1, 3, .., 15 high
  if constexpr (T == Q4_K || T == Q5_K) {
    const __m256 d = _mm256_set1_ps(half_to_float(blk));
    const __m256 dmin = _mm256_set1_ps(half_to_float(blk + 2));
    uint64_t sc, mn;
    unpack_scales_mins(blk + 4, sc, mn);
    factor = _mm256_mul_ps(_mm256_mul_ps(d, bytes_to_floats(sc)), _mm256_loadu_ps(x.d));
    // every weight of run j carries - dmin * m[j]: times the run's sum of x
    sub = _mm256_fmadd_ps(_mm256_mul_ps(dmin, bytes_to_floats(mn)), _mm256_loadu_ps(x.s), sub);
  } else {
    const __m256 d = _mm256_set1_ps(half_to_float(blk + 208));
    const __m128i sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192));
    const __m128i even_odd = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    sc16 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, even_odd));
    factor = _mm256_mul_ps(d, _mm256_loadu_ps(x.d));
    // every weight of sub-block k carries - 32 * d * sc[k]: times the sub-block's sum of x
    const __m256 sc_lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8));
    const __m256 sc_hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(sc8, sc8)));
    const __m256 sums = _mm256_fmadd_ps(sc_lo, _mm256_loadu_ps(x.h),
                                        _mm256_mul_ps(sc_hi, _mm256_loadu_ps(x.h + 8)));
    sub = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(32.f), d), sums, sub);
  }
  for_each_run<T>(blk, [&](int j, __m256i q) {
    // weights 0-7 and 16-23 of the run, then 8-15 and 24-31, as int16 (see kUnpackSlot)
    __m256i a = _mm256_unpacklo_epi8(q, zero), b = _mm256_unpackhi_epi8(q, zero);
    if constexpr (T == Q6_K) {  // sub-block 2j in the low 128 bits, 2j + 1 in the high ones
      const __m256i pick = _mm256_set1_epi16(static_cast<int16_t>((2 * j + 1) << 8 | 2 * j));
      const __m256i s = _mm256_shuffle_epi8(sc16, pick);  // int16 lane j of each half
      a = _mm256_mullo_epi16(a, s);  // |q * sc| <= 63 * 128: fits int16, and two madds int32
      b = _mm256_mullo_epi16(b, s);
    }
    const __m256 p = dot_i16(a, b, x.q + QK * j);
    const __m256 f = _mm256_permutevar8x32_ps(factor, _mm256_set1_epi32(j));
    if (j & 1) {
      acc1 = _mm256_fmadd_ps(f, p, acc1);
    } else {
      acc0 = _mm256_fmadd_ps(f, p, acc0);
    }
  });
}

// 32 unsigned integer weights (bytes) -> 32 floats scale * q - bias at out, with scale[0]
// for the first 16 weights and scale[1] for the last 16. scale * q is exact, so this rounds
// once, like gguf's (d * sc) * q - dmin * m.
inline void store_run(__m256i q, const __m256 scale[2], const __m256 bias[2], float* out) {
  const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
  for (int h = 0; h < 2; h++) {
    for (int e = 0; e < 2; e++) {
      const __m128i bytes = e ? _mm_unpackhi_epi64(halves[h], halves[h]) : halves[h];
      const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
      _mm256_storeu_ps(out + 16 * h + 8 * e, _mm256_fmsub_ps(scale[h], qf, bias[h]));
    }
  }
}

template <int64_t T>
inline void dequantize_k_block(const uint8_t* blk, float* out) {
  if constexpr (T == Q4_K || T == Q5_K) {
    const float d = half_to_float(blk), dmin = half_to_float(blk + 2);
    uint64_t sc, mn;
    unpack_scales_mins(blk + 4, sc, mn);
    for_each_run<T>(blk, [&](int j, __m256i q) {
      const __m256 scale = _mm256_set1_ps(d * static_cast<float>((sc >> 8 * j) & 0xFF));
      const __m256 bias = _mm256_set1_ps(dmin * static_cast<float>((mn >> 8 * j) & 0xFF));
      const __m256 scales[2] = {scale, scale}, biases[2] = {bias, bias};
      store_run(q, scales, biases, out + QK * j);
    });
  } else {  // Q6_K: a scale per 16 weights; (d * sc) * (q - 32) = (d * sc) * q - 32 * (d * sc)
    const float d = half_to_float(blk + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    for_each_run<T>(blk, [&](int j, __m256i q) {
      const float s0 = d * static_cast<float>(sc[2 * j]);
      const float s1 = d * static_cast<float>(sc[2 * j + 1]);
      const __m256 scales[2] = {_mm256_set1_ps(s0), _mm256_set1_ps(s1)};
      const __m256 biases[2] = {_mm256_set1_ps(32.f * s0), _mm256_set1_ps(32.f * s1)};
      store_run(q, scales, biases, out + QK * j);
    });
  }
}

// ---- rows ----------------------------------------------------------------------------------

// Dot product of one weight row (n_blocks blocks) with one quantized activation row, for the
// K-quants (the 32-value formats use dot_rows below, with MT = 1 for a single row). Templated on
// the format so each loop is branch-free; two accumulators hide the FMA latency.
template <int64_t TYPE>
inline float dot_row(const uint8_t* row, const XSuper* x, int64_t n_blocks) {
  constexpr int64_t BB = kBlockBytes<TYPE>;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), sub = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; b++) dot_k_block<TYPE>(row + b * BB, x[b], acc0, acc1, sub);
  return hsum(_mm256_sub_ps(_mm256_add_ps(acc0, acc1), sub));
}

// Dot products of one weight row with MT activation rows at once (32-value formats): each weight
// block is unpacked once and used MT times, which is what batched decoding needs. Every row is
// accumulated in the same order whatever MT is, so a sequence's numbers do not depend on which
// other sequences share its batch (the server's batching changes no output).
template <int64_t TYPE, int MT>
inline void dot_rows(const uint8_t* row, const XBlock* x, int64_t n_blocks, float* out) {
  constexpr int64_t BB = kBlockBytes<TYPE>;
  __m256 acc[MT];
  float extra[MT];
  for (int t = 0; t < MT; t++) { acc[t] = _mm256_setzero_ps(); extra[t] = 0.f; }
  for (int64_t b = 0; b < n_blocks; b++) {
    const uint8_t* blk = row + b * BB;
    const float d = half_to_float(blk);
    float offset = 0.f;  // per unit of sum(x): -8 d for Q4_0, m for Q4_1
    __m256i lo, hi;
    if constexpr (TYPE == Q8_0) {
      lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
      hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)));
    } else if constexpr (TYPE == Q4_0) {
      unpack_nibbles(blk + 2, lo, hi);
      offset = -8.f * d;
    } else {
      unpack_nibbles(blk + 4, lo, hi);
      offset = half_to_float(blk + 2);
    }
    for (int t = 0; t < MT; t++) {
      const XBlock& xb = x[t * n_blocks + b];
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), dot_i16(lo, hi, xb.q), acc[t]);
      extra[t] += offset * xb.s;
    }
  }
  for (int t = 0; t < MT; t++) out[t] = hsum(acc[t]) + extra[t];
}

// ---- x8: the 32-value formats repacked eight rows at a time ----------------------------------
//
// Repacked at load (quant/repack.py), rows 8g..8g+7 of W form group g, and block b of the group
// holds the eight rows' block b field by field:
//   Q4_0_X8: f16 d[8], nibbles[8][16]            (8 x 18 bytes)
//   Q4_1_X8: f16 d[8], f16 m[8], nibbles[8][16]  (8 x 20 bytes)
//   Q8_0_X8: f16 d[8], int8 chunks[16][16]       (8 x 34 bytes)
// so one F16C conversion gives the eight rows' scales and one FMA scales the eight rows' sums:
// about half the instructions per block of the row-wise kernel, whose scalar per-block work
// made Q4_0/Q4_1 arithmetic-bound (~10 GB/s on two Zen 3 cores).
//
// The rows sit in vector lanes, as the K-quants' below: chunk i (16 bytes) holds bytes 2i,
// 2i + 1 of each row, row r's at 2r, 2r + 1 (4-bit: its weights 2i + e in the low nibbles,
// 16 + 2i + e in the high ones, 8 chunks a block; Q8_0: its weights 2i + e, 16 chunks).
// Widened to 16 bits, row r's pair of weights lies in lanes 2r, 2r + 1, and one madd against
// the broadcast pair of activations leaves each row's partial sum in its own 32-bit lane: no
// horizontal reduction. With the rows in lanes the 4-bit kernel runs ~20% fewer instructions:
// on two Zen 3 cores it computes 11-16% faster from cache, and 22% faster from memory with four
// activation rows (batched decode); with one it was already as fast as memory, and stays so
// (BENCHMARKS.md). Q8_0 kept a row's 32 weights together until session 13 and reduced the
// eight rows' products with hadd; in lanes it is 1.2-2.1x as fast from memory on two Zen 5
// cores (1, 2, 4, 16 rows: 37.0 / 45.0, 32.4 / 53.4, 30.9 / 48.4, 8.1 / 17.1 GB/s), and 2.2x
// at 7B's shapes for 128 rows (217.3 -> 95.8 ms) with the 512-bit lanes below.
//
// Each activation row is computed alone, in the same order whatever M is, so batching still
// changes no output. The integer sum of a block is exact, whichever way it is added up; as a
// float it is exact for the 4-bit formats (< 2^24) and rounded to 24 bits for Q8_0.

// Two int16 values (an activation pair) broadcast to every 32-bit lane.
inline __m256i broadcast_pair(const int16_t* p) {
  int32_t pair;
  std::memcpy(&pair, p, 4);
  return _mm256_set1_epi32(pair);
}

// The vector operations of the x8 kernels with the rows in lanes (dot_groups_x8,
// dot_groups_k_x8), for a vector of 32-bit lanes that holds kGroups row groups side by side:
// 8 rows in a 256-bit vector (AVX2, AVX-VNNI), or two groups' 16 rows in a 512-bit one
// (AVX-512). The 512-bit kernels do the same arithmetic per lane with half the instructions:
// from cache on one Zen 5 core, 64 activation rows, Q4_Kx8 95 -> 168 G multiply-adds/s, Q6_Kx8
// 83 -> 134; Mistral 7B's shapes at 128 rows (two cores, benchmarks/prefill_matmul.py): Q4_Kx8
// 154.6 -> 90.9 ms, Q6_Kx8 173.9 -> 110.4. They are used from kNarrowRows + 1 activation rows.
// `g` points at each group's bytes; `off` is where to read in each.
struct Lanes256 {
  using I = __m256i;
  using F = __m256;
  static constexpr int kGroups = 1;

  static I widen(const uint8_t* const g[1], int64_t off) {   // 16 bytes -> 16 int16 lanes
    return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g[0] + off)));
  }
  static I widen_signed(const uint8_t* const g[1], int64_t off) {   // int8 -> int16
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g[0] + off)));
  }
  static I low4(I v) { return _mm256_and_si256(v, _mm256_set1_epi16(0x0F)); }
  static I high4(I v) { return _mm256_srli_epi16(v, 4); }
  // v | bits [from, from + width) of each 16-bit lane of h, moved to [4, 4 + width)
  static I add_bits(I v, I h, int from, int width) {
    if (from < 4) h = _mm256_slli_epi16(h, 4 - from);
    if (from > 4) h = _mm256_srli_epi16(h, from - 4);
    const I mask = _mm256_set1_epi16(static_cast<int16_t>(((1 << width) - 1) << 4));
    return _mm256_or_si256(v, _mm256_and_si256(h, mask));
  }
  static I dot_pair(I acc, I w, const int16_t* x) { return madd_add(acc, w, broadcast_pair(x)); }
  static I zero() { return _mm256_setzero_si256(); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  template <bool SIGNED>   // 8 bytes of each group -> floats
  static F bytes_to_floats(const uint8_t* const g[1], int64_t off) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(g[0] + off));
    return _mm256_cvtepi32_ps(SIGNED ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
  }
  static F halves_to_floats(const uint8_t* const g[1], int64_t off) {   // 8 f16 of each group
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g[0] + off)));
  }
  static F fzero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fadd(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static void store(float* out, F v) { _mm256_storeu_ps(out, v); }
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
struct Lanes512 {
  using I = __m512i;
  using F = __m512;
  static constexpr int kGroups = 2;

  static __m256i pair128(const uint8_t* const g[2], int64_t off) {   // 16 bytes of each group
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g[0] + off));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g[1] + off));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
  }
  static I widen(const uint8_t* const g[2], int64_t off) {
    return _mm512_cvtepu8_epi16(pair128(g, off));
  }
  static I widen_signed(const uint8_t* const g[2], int64_t off) {
    return _mm512_cvtepi8_epi16(pair128(g, off));
  }
  static I low4(I v) { return _mm512_and_si512(v, _mm512_set1_epi16(0x0F)); }
  static I high4(I v) { return _mm512_srli_epi16(v, 4); }
  static I add_bits(I v, I h, int from, int width) {
    if (from < 4) h = _mm512_slli_epi16(h, 4 - from);
    if (from > 4) h = _mm512_srli_epi16(h, from - 4);
    const I mask = _mm512_set1_epi16(static_cast<int16_t>(((1 << width) - 1) << 4));
    return _mm512_or_si512(v, _mm512_and_si512(h, mask));
  }
  static I dot_pair(I acc, I w, const int16_t* x) {
    int32_t pair;
    std::memcpy(&pair, x, 4);
    return _mm512_dpwssd_epi32(acc, w, _mm512_set1_epi32(pair));
  }
  static I zero() { return _mm512_setzero_si512(); }
  static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  template <bool SIGNED>
  static F bytes_to_floats(const uint8_t* const g[2], int64_t off) {
    int64_t a, b;
    std::memcpy(&a, g[0] + off, 8);
    std::memcpy(&b, g[1] + off, 8);
    const __m128i v = _mm_set_epi64x(b, a);
    return _mm512_cvtepi32_ps(SIGNED ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v));
  }
  static F halves_to_floats(const uint8_t* const g[2], int64_t off) {
    return _mm512_cvtph_ps(pair128(g, off));
  }
  static F fzero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fadd(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static void store(float* out, F v) { _mm512_storeu_ps(out, v); }
};
using KLanes = Lanes512;
#else
using KLanes = Lanes256;
#endif

// Up to this many activation rows, the x8 kernels take 256-bit vectors even where 512-bit ones
// exist. Those read two groups' bytes side by side, two streams a thread, which memory serves
// more slowly: from memory on two Zen 5 cores, Q4_Kx8 4096 x 4096, GB/s, 256 / 512 bits:
// 1 row 41.1 / 35.6 (any prefetch distance), 2 rows 36.0 / 32.4, 3 rows 30.2 / 31.4, 4 rows
// 25.2 / 31.7. Both give the same numbers.
constexpr int64_t kNarrowRows = 2;

// Activation rows an x8 tile dots at once.
constexpr int kTile = 4;

// Runs tile(std::integral_constant<int, MT>{}, m) over the M activation rows: tiles of kTile
// rows, then one tile of the 1-3 left over.
template <class Tile>
inline void for_each_tile(int64_t M, Tile&& tile) {
  int64_t m = 0;
  for (; m + kTile <= M; m += kTile) tile(std::integral_constant<int, kTile>{}, m);
  switch (M - m) {
    case 3: tile(std::integral_constant<int, 3>{}, m); break;
    case 2: tile(std::integral_constant<int, 2>{}, m); break;
    case 1: tile(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// Calls body(V{}) with the lanes that M activation rows take (see kNarrowRows).
template <class Body>
inline void with_lanes(int64_t M, Body&& body) {
  if (M <= kNarrowRows) body(Lanes256{});
  else body(KLanes{});
}

// The rows of V::kGroups groups (grp[0], ...) dotted with MT activation rows x[t * n_blocks ..]:
// out[8 * V::kGroups * t + 8 * k + r] for row r of group k. Each weight row is unpacked once
// per block for all MT activation rows; each activation row's arithmetic is the same whatever
// MT is.
template <class V, int64_t BASE, int MT>
inline void dot_groups_x8(const uint8_t* const grp[V::kGroups], const XBlock* x,
                          int64_t n_blocks, float* out, int64_t distance) {
  using F = typename V::F;
  constexpr int G = V::kGroups;
  constexpr int64_t BB = kBlockBytes<BASE>;
  constexpr int64_t HEAD = kX8Head<BASE>;
  F acc[MT], extra[MT];
  for (int t = 0; t < MT; t++) acc[t] = extra[t] = V::fzero();
  for (int64_t b = 0; b < n_blocks; b++) {
    const uint8_t* gb[G];
    for (int k = 0; k < G; k++) {
      gb[k] = grp[k] + b * 8 * BB;
      // a few lines a block, `distance` ahead: a steady stream, no bursts
      if (distance > 0) prefetch_lines(gb[k] + distance, 8 * BB);
    }
    const F d = V::halves_to_floats(gb, 0);
    typename V::I sums[MT];   // the rows' integer dot products with activation row t
    typename V::I low[MT], high[MT];   // Q8_0: weights 0-15 and 16-31; else the low and high
    for (int t = 0; t < MT; t++) low[t] = high[t] = V::zero();   // nibbles
    if constexpr (BASE == Q8_0) {
      for (int i = 0; i < 16; i++) {
        const auto w = V::widen_signed(gb, HEAD + 16 * i);
        for (int t = 0; t < MT; t++) {
          const int16_t* xq = x[t * n_blocks + b].q;
          if (i < 8) low[t] = V::dot_pair(low[t], w, xq + 2 * i);
          else high[t] = V::dot_pair(high[t], w, xq + 2 * i);
        }
      }
    } else {
      for (int i = 0; i < 8; i++) {
        const auto w = V::widen(gb, HEAD + 16 * i);
        const auto lo = V::low4(w), hi = V::high4(w);
        for (int t = 0; t < MT; t++) {
          const int16_t* xq = x[t * n_blocks + b].q;
          low[t] = V::dot_pair(low[t], lo, xq + 2 * i);
          high[t] = V::dot_pair(high[t], hi, xq + 16 + 2 * i);
        }
      }
    }
    for (int t = 0; t < MT; t++) sums[t] = V::add(low[t], high[t]);
    [[maybe_unused]] F m;
    if constexpr (BASE == Q4_1) m = V::halves_to_floats(gb, 16);
    for (int t = 0; t < MT; t++) {
      const XBlock& xb = x[t * n_blocks + b];
      const F dx = V::mul(d, V::set1(xb.d));
      acc[t] = V::fmadd(V::to_float(sums[t]), dx, acc[t]);
      if constexpr (BASE == Q4_1) {   // + m * sum(x)
        extra[t] = V::fmadd(m, V::set1(xb.s), extra[t]);
      } else if constexpr (BASE == Q4_0) {   // - 8 d * sum(x)
        extra[t] = V::fmadd(d, V::set1(-8.f * xb.s), extra[t]);
      }
    }
  }
  for (int t = 0; t < MT; t++) V::store(out + 8 * G * t, V::fadd(acc[t], extra[t]));
}

// Runs dot(grp, m, out) over every tile of M activation rows for the units u in [u0, u1) of
// V::kGroups row groups each (unit u: groups G u .. G u + G - 1; a last unit short of groups
// repeats its last one and drops those outputs), and stores out into y (M, N).
template <class V, class Dot>
void units_x8(const uint8_t* w, int64_t row_bytes, int64_t M, int64_t N, int64_t u0, int64_t u1,
              float* y, Dot&& dot) {
  constexpr int G = V::kGroups;
  const int64_t distance = prefetch_bytes(), group_bytes = 8 * row_bytes, n_groups = N / 8;
  for (int64_t u = u0; u < u1; u++) {
    const uint8_t* grp[G];
    const int64_t groups = std::min<int64_t>(G, n_groups - G * u);
    for (int k = 0; k < G; k++) {
      grp[k] = w + (G * u + std::min<int64_t>(k, groups - 1)) * group_bytes;
      if (u == u0 && distance > 0) prefetch_lines(grp[k], distance);   // the stream's start
    }
    float out[8 * G * kTile];
    // Only the first tile prefetches: the others find the groups in cache. The prefetches may
    // run past this thread's rows (or the matrix): they are hints, never faults.
    for_each_tile(M, [&](auto mt, int64_t m) {
      constexpr int MT = decltype(mt)::value;
      dot(grp, m, mt, out, m == 0 ? distance : 0);
      for (int t = 0; t < MT; t++) {
        std::copy(out + 8 * G * t, out + 8 * G * t + 8 * groups, y + (m + t) * N + 8 * G * u);
      }
    });
  }
}

template <int64_t BASE>
void matmul_x8(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t N,
               int64_t row_bytes, float* yp) {
  const int64_t n_blocks = K / QK;
  std::vector<XBlock> xq(M * n_blocks);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++) quantize_row(xp + m * K, xq.data() + m * n_blocks, n_blocks);
  });
  const auto run = [&](auto lanes) {
    using V = decltype(lanes);
    constexpr int G = V::kGroups;
    at::parallel_for(0, (N / 8 + G - 1) / G, 2 / G, [&](int64_t u0, int64_t u1) {
      units_x8<V>(wp, row_bytes, M, N, u0, u1, yp,
                  [&](const uint8_t* const* grp, int64_t m, auto mt, float* out, int64_t dist) {
                    dot_groups_x8<V, BASE, decltype(mt)::value>(grp, xq.data() + m * n_blocks,
                                                                 n_blocks, out, dist);
                  });
    });
  };
  with_lanes(M, run);
}

// ---- K-quants repacked eight rows at a time, the rows in the vector lanes --------------------
//
// The K-quant rows kernel (dot_k_block) spends 13-14 instructions on each run of 32 weights:
// the integer dot product, then a conversion, a permute and an FMA for the run's own scale, and
// the block's scales and mins unpacked in scalar code for every row. On two Zen 3 cores Q4_K
// computes at only ~14 GB/s that way, so it cannot keep up with memory (11-12 GB/s from DRAM,
// ~50-60% of the read bandwidth). The x8 layouts put each of the eight rows of a group in one
// 32-bit lane instead. Block b of group g (rows 8g..8g+7):
//
//   Q4_K_X8 (8 x 144 bytes): f16 d[8] | f16 dmin[8] | scales[12][8] | nibbles
//   Q5_K_X8 (8 x 176 bytes): f16 d[8] | f16 dmin[8] | scales[12][8] | nibbles | high bits
//   Q6_K_X8 (8 x 210 bytes): f16 d[8] | int8 scales[16][8] | nibbles | high bits
//
//   scales[k][r]: byte k of row r's scale bytes (GGUF's, transposed);
//   nibbles: 8 runs j x 8 chunks i x 16 bytes; byte 2r + e of chunk i of run j holds the low 4
//     bits of weight 32j + 2i + e of row r in its low nibble and of weight 32j + 16 + 2i + e in
//     its high nibble (e = 0, 1);
//   high bits: the bits above the nibble, W per weight (Q5_K: 1, Q6_K: 2), for C chunks in 16
//     bytes (C = 4 / W: 16 bytes per 4 chunks for Q5_K, per 2 for Q6_K); in the 16 bytes of
//     chunks i (i / C = const) of run j, byte L holds lane L's (L = 2r + e) high bits of its
//     first weight (32j + 2i + e) at bit 2W (i % C) and of its second (32j + 16 + 2i + e) at bit
//     2W (i % C) + W.
//
// Widening a chunk's bytes to int16 puts row r's weight pair (2i, 2i + 1) in lanes 2r, 2r + 1,
// so one madd with the activation pair broadcast gives each row's partial sum in its own 32-bit
// lane: no horizontal reduction, and a run's scale is one vector over the rows. Per row and run
// this is 2 madds and ~5 simple operations for Q4_K (~6 more for Q5_K and Q6_K, whose high bits
// are spread too); madd, the multiply, is the bound. Activations are the 32-value runs of
// quantize_row (natural order), one scale per run, so each activation row is computed alone, in
// the same order whatever M is. Q4_K's integer sums are exact in float32 (< 32 * 15 * 32767 <
// 2^24); Q5_K's and Q6_K's may round in their last bit.
//
// Several activation rows (batched decode, pre-fill) go through in tiles of kTile rows (the
// rows left over: one tile of 1-3), which unpack each chunk of weights and each run's scales
// once for the tile, so that madd is the bound there too. From memory on two Zen 5 cores
// (benchmarks/kernels.py, 4 rows), a row at a time / tiles of four: Q4_Kx8 16.6 / 24.7 GB/s,
// Q5_Kx8 13.7 / 27.8, Q6_Kx8 15.8 / 30.0 (256-bit; 512-bit vectors, Lanes512 above, then
// 32.7, 37.5 and 29.6).

template <int64_t BASE>
constexpr int64_t kGroupBlock = 8 * kBlockBytes<BASE>;
template <int64_t BASE>
constexpr int64_t kNibbles = BASE == Q6_K ? 144 : 128;      // where the nibbles start
template <int64_t BASE>
constexpr int64_t kHighBits = kNibbles<BASE> + 1024;        // where the high bits start
template <int64_t BASE>
constexpr int kHighWidth = BASE == Q6_K ? 2 : 1;            // W: high bits per weight
template <int64_t BASE>
constexpr int kHighChunks = 4 / kHighWidth<BASE>;           // C: chunks per 16 bytes of them

// The 64 six-bit scales and mins of a Q4_K_X8 block, as bytes [run j][row r].
inline void unpack_scales_x8(const uint8_t* packed, uint8_t sc[64], uint8_t mn[64]) {
  const __m256i low6 = _mm256_set1_epi8(0x3F), low4 = _mm256_set1_epi8(0x0F),
                bits45 = _mm256_set1_epi8(0x30);
  // bytes 0-3, 4-7 and 8-11 of the eight rows' packed scales (unpack_scales_mins's w[0..2])
  const __m256i w0 = load256(packed), w1 = load256(packed + 32), w2 = load256(packed + 64);
  const auto store = [](uint8_t* to, __m256i v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), v);
  };
  store(sc, _mm256_and_si256(w0, low6));
  store(mn, _mm256_and_si256(w1, low6));
  store(sc + 32, _mm256_or_si256(_mm256_and_si256(w2, low4),
                                 _mm256_and_si256(_mm256_srli_epi16(w0, 2), bits45)));
  store(mn + 32, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(w2, 4), low4),
                                 _mm256_and_si256(_mm256_srli_epi16(w1, 2), bits45)));
}

// The rows of V::kGroups K-quant x8 groups (grp[0], ...) dotted with MT activation rows:
// out[8 * V::kGroups * t + 8 * k + r] for row r of group k and activation row t, whose runs
// are x + t * n_runs and whose sums of 16 activations (for Q6_K's offset of 32) are
// x_16 + 2t * n_runs. Each chunk of weights, and each run's scales, is unpacked once for all MT
// rows; each activation row's arithmetic is the same whatever MT is.
template <class V, int64_t BASE, int MT>
inline void dot_groups_k_x8(const uint8_t* const grp[V::kGroups], const XBlock* x,
                            const float* x_16, int64_t n_blocks, float* out, int64_t distance) {
  using I = typename V::I;
  using F = typename V::F;
  constexpr int G = V::kGroups;
  constexpr int64_t GB = kGroupBlock<BASE>;
  constexpr int W = kHighWidth<BASE>, C = kHighChunks<BASE>;
  const int64_t n_runs = 8 * n_blocks;
  F total[MT], subtract[MT];
  for (int t = 0; t < MT; t++) total[t] = subtract[t] = V::fzero();
  alignas(32) uint8_t sc[G][64], mn[G][64];   // [group][run j][row r]
  const uint8_t* scp[G];
  const uint8_t* mnp[G];
  for (int k = 0; k < G; k++) {
    scp[k] = sc[k];
    mnp[k] = mn[k];
  }
  for (int64_t b = 0; b < n_blocks; b++) {
    const uint8_t* gb[G];
    for (int k = 0; k < G; k++) {
      gb[k] = grp[k] + b * GB;
      if (distance > 0) prefetch_lines(gb[k] + distance, GB);   // a block's lines, ahead
      if constexpr (BASE != Q6_K) unpack_scales_x8(gb[k] + 32, sc[k], mn[k]);
    }
    F block[MT], block_sub[MT];
    for (int t = 0; t < MT; t++) block[t] = block_sub[t] = V::fzero();
    for (int j = 0; j < 8; j++) {
      const int64_t run = 8 * b + j;
      I acc0[MT], acc1[MT];
      for (int t = 0; t < MT; t++) acc0[t] = acc1[t] = V::zero();
      [[maybe_unused]] I high;   // the high bits of C chunks, a byte a lane
#pragma GCC unroll 8
      for (int i = 0; i < 8; i++) {
        const I bytes = V::widen(gb, kNibbles<BASE> + 128 * j + 16 * i);
        I first = V::low4(bytes), second = V::high4(bytes);
        if constexpr (BASE != Q4_K) {  // the high bits to bit 4 of each lane
          if (i % C == 0) high = V::widen(gb, kHighBits<BASE> + 16 * (8 / C) * j + 16 * (i / C));
          first = V::add_bits(first, high, 2 * W * (i % C), W);
          second = V::add_bits(second, high, 2 * W * (i % C) + W, W);
        }
        // against activations (2i, 2i + 1) and (16 + 2i, 17 + 2i) of each row
        for (int t = 0; t < MT; t++) {
          const int16_t* xq = x[t * n_runs + run].q;
          acc0[t] = V::dot_pair(acc0[t], first, xq + 2 * i);
          acc1[t] = V::dot_pair(acc1[t], second, xq + 16 + 2 * i);
        }
      }
      if constexpr (BASE != Q6_K) {  // one scale and min per run
        const F scale = V::template bytes_to_floats<false>(scp, 8 * j),
                min = V::template bytes_to_floats<false>(mnp, 8 * j);
        for (int t = 0; t < MT; t++) {
          const XBlock& xr = x[t * n_runs + run];
          const F sum = V::to_float(V::add(acc0[t], acc1[t]));
          block[t] = V::fmadd(V::mul(scale, V::set1(xr.d)), sum, block[t]);
          block_sub[t] = V::fmadd(min, V::set1(xr.s), block_sub[t]);
        }
      } else {  // a scale per 16 weights: sub-blocks 2j (first halves) and 2j + 1
        const F s0 = V::template bytes_to_floats<true>(gb, 16 + 16 * j),
                s1 = V::template bytes_to_floats<true>(gb, 24 + 16 * j);
        for (int t = 0; t < MT; t++) {
          const F xd = V::set1(x[t * n_runs + run].d);
          const float* sums16 = x_16 + 2 * t * n_runs + 2 * run;
          block[t] = V::fmadd(V::mul(s0, xd), V::to_float(acc0[t]), block[t]);
          block[t] = V::fmadd(V::mul(s1, xd), V::to_float(acc1[t]), block[t]);
          // every weight carries -32 d sc: times its 16 activations' sum
          block_sub[t] = V::fmadd(s0, V::set1(sums16[0]), block_sub[t]);
          block_sub[t] = V::fmadd(s1, V::set1(sums16[1]), block_sub[t]);
        }
      }
    }
    const F d = V::halves_to_floats(gb, 0);
    const F dmin = BASE != Q6_K ? V::halves_to_floats(gb, 16) : V::mul(V::set1(32.f), d);
    for (int t = 0; t < MT; t++) {
      total[t] = V::fmadd(d, block[t], total[t]);
      subtract[t] = V::fmadd(dmin, block_sub[t], subtract[t]);
    }
  }
  for (int t = 0; t < MT; t++) V::store(out + 8 * G * t, V::sub(total[t], subtract[t]));
}

template <int64_t BASE>
void matmul_k_x8(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t N,
                 int64_t row_bytes, float* yp) {
  const int64_t n_runs = K / QK, n_blocks = K / QK_K;
  std::vector<XBlock> xq(M * n_runs);
  std::vector<float> x_16(BASE == Q6_K ? M * 2 * n_runs : 0);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++) {
      XBlock* runs = xq.data() + m * n_runs;
      quantize_row(xp + m * K, runs, n_runs);
      for (int64_t i = 0; i < (BASE == Q6_K ? 2 * n_runs : 0); i++) {
        int32_t sum = 0;
        for (int t = 0; t < 16; t++) sum += runs[i / 2].q[16 * (i % 2) + t];
        x_16[m * 2 * n_runs + i] = runs[i / 2].d * static_cast<float>(sum);
      }
    }
  });
  with_lanes(M, [&](auto lanes) {
    using V = decltype(lanes);
    constexpr int G = V::kGroups;
    at::parallel_for(0, (N / 8 + G - 1) / G, 2 / G, [&](int64_t u0, int64_t u1) {
      units_x8<V>(wp, row_bytes, M, N, u0, u1, yp,
                  [&](const uint8_t* const* grp, int64_t m, auto mt, float* out, int64_t dist) {
                    dot_groups_k_x8<V, BASE, decltype(mt)::value>(
                        grp, xq.data() + m * n_runs,
                        BASE == Q6_K ? x_16.data() + m * 2 * n_runs : nullptr, n_blocks, out,
                        dist);
                  });
    });
  });
}

// Where weight t (< 32) of run j of row r of a K-quant x8 block lives: its chunk's byte (the
// nibble) and which nibble, and (Q5_K, Q6_K) its high bits' byte and shift.
struct LanePlace {
  int64_t nibble_byte, nibble_shift, high_byte, high_shift;
};

template <int64_t BASE>
constexpr LanePlace lane_place(int r, int j, int t) {
  const int second = t / 16, i = t % 16 / 2, lane = 2 * r + t % 2;
  constexpr int W = kHighWidth<BASE>, C = kHighChunks<BASE>;
  return {kNibbles<BASE> + 128 * j + 16 * i + lane, 4 * second,
          kHighBits<BASE> + 16 * (8 / C) * j + 16 * (i / C) + lane, 2 * W * (i % C) + W * second};
}

// Bytes 2i + e (i < 8, e = 0, 1) of chunks i: the two bytes at p + stride * (i / per) for each
// i, per chunks sharing them. For row r these are its lanes 2r, 2r + 1.
inline __m128i gather_pairs(const uint8_t* p, int64_t stride, int per) {
  alignas(16) uint16_t pairs[8];
  for (int i = 0; i < 8; i++) std::memcpy(&pairs[i], p + stride * (i / per), 2);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(pairs));
}

// Row n of a K-quant x8 matrix dequantized into out (the pre-fill reads weights this way): each
// run's 32 weights gathered back to the natural order, then dequantized as dequantize_k_block
// does (the same floats, bit for bit).
template <int64_t BASE>
void dequantize_row_k_x8(const uint8_t* wp, int64_t row_bytes, int64_t n_blocks, int64_t n,
                         float* out) {
  constexpr int W = kHighWidth<BASE>, C = kHighChunks<BASE>;
  const int r = static_cast<int>(n % 8);
  const uint8_t* grp = wp + (n - r) * row_bytes;
  const __m128i low4 = _mm_set1_epi8(0x0F), width = _mm_set1_epi8((1 << W) - 1);
  __m128i chunk_is[C];   // bytes 2i + e whose chunk i has i % C == k
  for (int k = 0; k < C; k++) {
    alignas(16) uint8_t sel[16];
    for (int pos = 0; pos < 16; pos++) sel[pos] = pos / 2 % C == k ? 0xFF : 0;
    chunk_is[k] = _mm_load_si128(reinterpret_cast<const __m128i*>(sel));
  }
  for (int64_t b = 0; b < n_blocks; b++) {
    const uint8_t* gb = grp + b * kGroupBlock<BASE>;
    const float d = half_to_float(gb + 2 * r);
    uint64_t sc = 0, mn = 0;
    float dmin = 0.f;
    if constexpr (BASE != Q6_K) {
      dmin = half_to_float(gb + 16 + 2 * r);
      uint8_t packed[12];
      for (int k = 0; k < 12; k++) packed[k] = gb[32 + 8 * k + r];
      unpack_scales_mins(packed, sc, mn);
    }
    for (int j = 0; j < 8; j++) {
      // byte 2i + e: weight 2i + e in its low nibble, 16 + 2i + e in its high one
      const __m128i q = gather_pairs(gb + kNibbles<BASE> + 128 * j + 2 * r, 16, 1);
      __m128i first = _mm_and_si128(q, low4), second = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
      if constexpr (BASE != Q4_K) {   // their high bits, at 2W (i % C) and 2W (i % C) + W
        const __m128i h =
            gather_pairs(gb + kHighBits<BASE> + 16 * (8 / C) * j + 2 * r, 16, C);
        for (int k = 0; k < C; k++) {
          const __m128i h0 = _mm_and_si128(_mm_srli_epi16(h, 2 * W * k), width);
          const __m128i h1 = _mm_and_si128(_mm_srli_epi16(h, 2 * W * k + W), width);
          first = _mm_or_si128(first, _mm_and_si128(_mm_slli_epi16(h0, 4), chunk_is[k]));
          second = _mm_or_si128(second, _mm_and_si128(_mm_slli_epi16(h1, 4), chunk_is[k]));
        }
      }
      __m256 scales[2], biases[2];
      if constexpr (BASE != Q6_K) {
        scales[0] = scales[1] = _mm256_set1_ps(d * static_cast<float>((sc >> 8 * j) & 0xFF));
        biases[0] = biases[1] = _mm256_set1_ps(dmin * static_cast<float>((mn >> 8 * j) & 0xFF));
      } else {  // (d * sc) * q - 32 * (d * sc), sub-blocks 2j and 2j + 1
        for (int h = 0; h < 2; h++) {
          const auto sc_h = static_cast<int8_t>(gb[16 + 8 * (2 * j + h) + r]);
          const float s = d * static_cast<float>(sc_h);
          scales[h] = _mm256_set1_ps(s);
          biases[h] = _mm256_set1_ps(32.f * s);
        }
      }
      store_run(_mm256_set_m128i(second, first), scales, biases, out + b * QK_K + QK * j);
    }
  }
}

// Weight v (< 256) of one GGUF K-quant block, as its unsigned integer (layouts: file header).
template <int64_t BASE>
inline int gguf_k_value(const uint8_t* blk, int v) {
  if constexpr (BASE == Q4_K || BASE == Q5_K) {
    const int j = v / 32, qs = BASE == Q4_K ? 16 : 48;
    const int low = blk[qs + 32 * (j / 2) + v % 32] >> 4 * (j % 2) & 0x0F;
    return BASE == Q4_K ? low : low | (blk[16 + v % 32] >> j & 1) << 4;
  } else {
    const int h = v / 128, k = v % 128 / 32, i = v % 32;
    return (blk[64 * h + 32 * (k % 2) + i] >> 4 * (k / 2) & 0x0F) |
           (blk[128 + 32 * h + i] >> 2 * k & 3) << 4;
  }
}

// One group's block b in the x8 layout, from the eight rows' GGUF blocks.
template <int64_t BASE>
void repack_k_block(const uint8_t* rows[8], uint8_t* out) {
  std::memset(out, 0, kGroupBlock<BASE>);
  for (int r = 0; r < 8; r++) {
    const uint8_t* blk = rows[r];
    if constexpr (BASE != Q6_K) {
      std::memcpy(out + 2 * r, blk, 2);                // d
      std::memcpy(out + 16 + 2 * r, blk + 2, 2);       // dmin
      for (int k = 0; k < 12; k++) out[32 + 8 * k + r] = blk[4 + k];
    } else {
      std::memcpy(out + 2 * r, blk + 208, 2);          // d
      for (int k = 0; k < 16; k++) out[16 + 8 * k + r] = blk[192 + k];
    }
    for (int v = 0; v < 256; v++) {
      const int q = gguf_k_value<BASE>(blk, v);
      const LanePlace p = lane_place<BASE>(r, v / 32, v % 32);
      out[p.nibble_byte] |= static_cast<uint8_t>((q & 0x0F) << p.nibble_shift);
      if constexpr (BASE != Q4_K) {
        out[p.high_byte] |= static_cast<uint8_t>((q >> 4) << p.high_shift);
      }
    }
  }
}

// y[m, n] for rows n in [n0, n1) of W and all M rows of x (n_blocks blocks each). The weight
// row stays in L1 while every activation row passes over it; the 32-value formats take four
// activation rows per pass.
template <int64_t TYPE, class X>
void rows_kernel(const uint8_t* w, int64_t row_bytes, int64_t n_blocks, const X* xq, int64_t M,
                 float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t distance = prefetch_bytes();
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* row = w + n * row_bytes;
    prefetch_ahead(row, row_bytes, w + n1 * row_bytes, distance, n == n0);
    if constexpr (std::is_same_v<X, XBlock>) {
      float out[4];
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {
        dot_rows<TYPE, 4>(row, xq + m * n_blocks, n_blocks, out);
        for (int t = 0; t < 4; t++) y[(m + t) * N + n] = out[t];
      }
      for (; m < M; m++) {
        dot_rows<TYPE, 1>(row, xq + m * n_blocks, n_blocks, out);
        y[m * N + n] = out[0];
      }
    } else {
      for (int64_t m = 0; m < M; m++) y[m * N + n] = dot_row<TYPE>(row, xq + m * n_blocks, n_blocks);
    }
  }
}

// Quantizes the M rows of x (K values each) into activation blocks, then runs rows_kernel on
// all rows of w in parallel.
template <int64_t TYPE, class X>
void matmul(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t N,
            int64_t row_bytes, float* yp) {
  constexpr int64_t values = std::is_same_v<X, XSuper> ? QK_K : QK;
  const int64_t n_blocks = K / values;
  std::vector<X> xq(M * n_blocks);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++) {
      if constexpr (std::is_same_v<X, XSuper>) {
        quantize_row_k(xp + m * K, xq.data() + m * n_blocks, n_blocks);
      } else {
        quantize_row(xp + m * K, xq.data() + m * n_blocks, n_blocks);
      }
    }
  });
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    rows_kernel<TYPE>(wp, row_bytes, n_blocks, xq.data(), M, yp, N, n0, n1);
  });
}

// ---- dequantizing -------------------------------------------------------------------------

// One 32-value block's weights, d * q + mn, at out (q: 32 int8 for Q8_0, else 16 bytes of
// nibbles, low nibbles first). d * q is exact in float32, so the FMA rounds once, like gguf's
// NumPy reference.
template <int64_t BASE>
inline void dequantize_run_32(const uint8_t* q, float d, float mn, float* out) {
  const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(mn);
  if constexpr (BASE == Q8_0) {  // mn is 0
    for (int i = 0; i < 4; i++) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i));
      const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(vd, v));
    }
  } else {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i nibbles[2] = {_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low)};
    for (int h = 0; h < 2; h++) {
      for (int e = 0; e < 2; e++) {
        const __m128i bytes = e ? _mm_unpackhi_epi64(nibbles[h], nibbles[h]) : nibbles[h];
        const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
        _mm256_storeu_ps(out + 16 * h + 8 * e, _mm256_fmadd_ps(vd, v, vm));
      }
    }
  }
}

// Row n of a 32-value format (GGUF order, or repacked eight rows at a time when X8), n_blocks
// blocks, dequantized into out. In an x8 matrix block b of rows 8g..8g+7 holds their eight f16
// scales (Q4_1: then their eight mins), then their eight weight runs.
template <int64_t BASE, bool X8>
void dequantize_row_32(const uint8_t* wp, int64_t row_bytes, int64_t n_blocks, int64_t n,
                       float* out) {
  constexpr int64_t BB = kBlockBytes<BASE>;
  constexpr int64_t QB = BASE == Q8_0 ? 32 : 16;      // bytes of weights in a block
  const int64_t r = X8 ? n % 8 : 0;
  const uint8_t* base = X8 ? wp + (n - r) * row_bytes : wp + n * row_bytes;
  for (int64_t b = 0; b < n_blocks; b++) {
    const uint8_t* blk = X8 ? base + b * 8 * BB : base + b * BB;
    const uint8_t* scale = X8 ? blk + 2 * r : blk;
    const uint8_t* min = X8 ? blk + 16 + 2 * r : blk + 2;
    const uint8_t* q = X8 ? blk + kX8Head<BASE> : blk + BB - QB;
    alignas(16) uint8_t gathered[QB];    // an x8 row's bytes from its lanes of the chunks
    if constexpr (X8) {
      for (int64_t h = 0; h < QB / 16; h++) {   // 8 chunks at a time
        _mm_store_si128(reinterpret_cast<__m128i*>(gathered + 16 * h),
                        gather_pairs(q + 128 * h + 2 * r, 16, 1));
      }
      q = gathered;
    }
    const float d = half_to_float(scale);
    const float mn = BASE == Q4_1 ? half_to_float(min) : BASE == Q4_0 ? -8.f * d : 0.f;
    dequantize_run_32<BASE>(q, d, mn, out + b * QK);
  }
}

// ---- 16-bit float weights (GGUF F16 / BF16) with float32 activations -----------------------

// 8 weights (F16 or BF16 bits) -> 8 floats.
template <bool BF16>
inline __m256 load8_half(const uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) {  // bfloat16 is the top half of a float32
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  } else {
    return _mm256_cvtph_ps(bits);
  }
}

template <bool BF16>
inline float half_scalar(uint16_t h) {
  if constexpr (BF16) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  } else {
    return _cvtsh_ss(h);
  }
}

template <bool BF16>
void half_rows(const uint16_t* w, int64_t K, const float* x, int64_t M, float* y, int64_t N,
               int64_t n0, int64_t n1) {
  const int64_t distance = prefetch_bytes();
  const auto* bytes = reinterpret_cast<const uint8_t*>(w);
  for (int64_t n = n0; n < n1; n++) {
    const uint16_t* row = w + n * K;
    prefetch_ahead(bytes + 2 * n * K, 2 * K, bytes + 2 * n1 * K, distance, n == n0);
    for (int64_t m = 0; m < M; m++) {
      const float* xm = x + m * K;
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        acc0 = _mm256_fmadd_ps(load8_half<BF16>(row + k), _mm256_loadu_ps(xm + k), acc0);
        acc1 = _mm256_fmadd_ps(load8_half<BF16>(row + k + 8), _mm256_loadu_ps(xm + k + 8), acc1);
      }
      float tail = 0.f;
      for (; k < K; k++) tail += half_scalar<BF16>(row[k]) * xm[k];
      y[m * N + n] = hsum(_mm256_add_ps(acc0, acc1)) + tail;
    }
  }
}


// One row of a K-quant (n_blocks blocks of 256 values) dequantized into out.
template <int64_t TYPE>
void dequantize_row_k(const uint8_t* row, int64_t n_blocks, float* out) {
  for (int64_t b = 0; b < n_blocks; b++) {
    dequantize_k_block<TYPE>(row + b * kBlockBytes<TYPE>, out + b * QK_K);
  }
}

// One row of K 16-bit floats converted into out.
template <bool BF16>
void dequantize_row_half(const uint16_t* row, int64_t K, float* out) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) _mm256_storeu_ps(out + k, load8_half<BF16>(row + k));
  for (; k < K; k++) out[k] = half_scalar<BF16>(row[k]);
}

}  // namespace

int64_t prefetch_bytes() { return g_prefetch_bytes.load(std::memory_order_relaxed); }

void set_prefetch_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_prefetch_bytes: distance must be >= 0, got ", bytes);
  g_prefetch_bytes.store(bytes, std::memory_order_relaxed);
}

int64_t stream_read(torch::Tensor buf) {
  TORCH_CHECK(buf.scalar_type() == torch::kUInt8 && buf.is_contiguous(),
              "stream_read: a contiguous uint8 tensor");
  const uint8_t* p = buf.data_ptr<uint8_t>();
  const int64_t n = buf.numel() / 256;  // 256-byte chunks: 8 independent loads in flight
  std::atomic<uint64_t> total{0};
  at::parallel_for(0, n, 1024, [&](int64_t c0, int64_t c1) {
    __m256i acc[8];
    for (auto& a : acc) a = _mm256_setzero_si256();
    for (int64_t c = c0; c < c1; c++) {
      for (int i = 0; i < 8; i++) acc[i] = _mm256_xor_si256(acc[i], load256(p + 256 * c + 32 * i));
    }
    for (int i = 1; i < 8; i++) acc[0] = _mm256_xor_si256(acc[0], acc[i]);
    total ^= static_cast<uint64_t>(_mm256_extract_epi64(acc[0], 0));
  });
  return static_cast<int64_t>(total.load());
}

void qmatmul_into(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t N,
                  int64_t row_bytes, int64_t type, float* yp) {
  if (is_half(type)) {
    const auto* hp = reinterpret_cast<const uint16_t*>(wp);
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      if (type == BF16) half_rows<true>(hp, K, xp, M, yp, N, n0, n1);
      else half_rows<false>(hp, K, xp, M, yp, N, n0, n1);
    });
    return;
  }
  switch (type) {
    case Q8_0: matmul<Q8_0, XBlock>(xp, M, K, wp, N, row_bytes, yp); break;
    case Q4_0: matmul<Q4_0, XBlock>(xp, M, K, wp, N, row_bytes, yp); break;
    case Q4_1: matmul<Q4_1, XBlock>(xp, M, K, wp, N, row_bytes, yp); break;
    case Q4_K: matmul<Q4_K, XSuper>(xp, M, K, wp, N, row_bytes, yp); break;
    case Q5_K: matmul<Q5_K, XSuper>(xp, M, K, wp, N, row_bytes, yp); break;
    case Q6_K: matmul<Q6_K, XSuper>(xp, M, K, wp, N, row_bytes, yp); break;
    case Q4_0_X8: matmul_x8<Q4_0>(xp, M, K, wp, N, row_bytes, yp); break;
    case Q4_1_X8: matmul_x8<Q4_1>(xp, M, K, wp, N, row_bytes, yp); break;
    case Q8_0_X8: matmul_x8<Q8_0>(xp, M, K, wp, N, row_bytes, yp); break;
    case Q4_K_X8: matmul_k_x8<Q4_K>(xp, M, K, wp, N, row_bytes, yp); break;
    case Q5_K_X8: matmul_k_x8<Q5_K>(xp, M, K, wp, N, row_bytes, yp); break;
    case Q6_K_X8: matmul_k_x8<Q6_K>(xp, M, K, wp, N, row_bytes, yp); break;
    default: TORCH_CHECK(false, "qmatmul: unsupported ggml type ", type);
  }
}

void check_weight(const torch::Tensor& w, int64_t K, int64_t type, const char* what) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous(), what,
              ": weight must be a contiguous 2-D uint8 tensor");
  const int64_t bv = block_values(type), bb = block_bytes(type);
  TORCH_CHECK(K % bv == 0, what, ": K must be a multiple of ", bv, ", got ", K);
  TORCH_CHECK(w.size(1) == K / bv * bb, what, ": weight row has ", w.size(1),
              " bytes, expected ", K / bv * bb, " for K = ", K);
  TORCH_CHECK(!is_x8(type) || w.size(0) % 8 == 0, what, ": a matrix repacked 8 rows at a time "
              "must have a multiple of 8 rows, got ", w.size(0));
}

torch::Tensor matmul_tensor(torch::Tensor x, torch::Tensor w, int64_t type, const char* what,
                            MatmulInto into) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, what,
              ": x must be 2-D float32");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_weight(w, K, type, what);
  auto y = torch::empty({M, N}, x.options());
  into(x.data_ptr<float>(), M, K, w.data_ptr<uint8_t>(), N, w.size(1), type, y.data_ptr<float>());
  return y;
}

torch::Tensor qmatmul(torch::Tensor x, torch::Tensor w, int64_t type) {
  return matmul_tensor(x, w, type, "qmatmul", qmatmul_into);
}

std::vector<torch::Tensor> quantize_activations(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.size(1) % QK == 0,
              "quantize_activations: x must be float32 (M, K) with K a multiple of ", QK);
  x = x.contiguous();
  const int64_t M = x.size(0), n_blocks = x.size(1) / QK;
  std::vector<XBlock> blocks(M * n_blocks);
  for (int64_t m = 0; m < M; m++) {
    quantize_row(x.data_ptr<float>() + m * x.size(1), blocks.data() + m * n_blocks, n_blocks);
  }
  auto q = torch::empty({M, n_blocks * QK}, torch::kInt16);
  auto d = torch::empty({M, n_blocks}, torch::kFloat32), s = torch::empty_like(d);
  for (int64_t i = 0; i < M * n_blocks; i++) {
    std::copy(blocks[i].q, blocks[i].q + QK, q.data_ptr<int16_t>() + i * QK);
    d.data_ptr<float>()[i] = blocks[i].d;
    s.data_ptr<float>()[i] = blocks[i].s;
  }
  return {q, d, s};
}

void dequantize_rows_into(const uint8_t* wp, int64_t row_bytes, int64_t type, int64_t K,
                          int64_t n0, int64_t n1, float* out) {
  const int64_t n_blocks = K / block_values(type);
  for (int64_t n = n0; n < n1; n++) {
    float* o = out + (n - n0) * K;
    const uint8_t* row = wp + n * row_bytes;
    switch (type) {
      case Q8_0: dequantize_row_32<Q8_0, false>(wp, row_bytes, n_blocks, n, o); break;
      case Q4_0: dequantize_row_32<Q4_0, false>(wp, row_bytes, n_blocks, n, o); break;
      case Q4_1: dequantize_row_32<Q4_1, false>(wp, row_bytes, n_blocks, n, o); break;
      case Q8_0_X8: dequantize_row_32<Q8_0, true>(wp, row_bytes, n_blocks, n, o); break;
      case Q4_0_X8: dequantize_row_32<Q4_0, true>(wp, row_bytes, n_blocks, n, o); break;
      case Q4_1_X8: dequantize_row_32<Q4_1, true>(wp, row_bytes, n_blocks, n, o); break;
      case Q4_K: dequantize_row_k<Q4_K>(row, n_blocks, o); break;
      case Q4_K_X8: dequantize_row_k_x8<Q4_K>(wp, row_bytes, n_blocks, n, o); break;
      case Q5_K_X8: dequantize_row_k_x8<Q5_K>(wp, row_bytes, n_blocks, n, o); break;
      case Q6_K_X8: dequantize_row_k_x8<Q6_K>(wp, row_bytes, n_blocks, n, o); break;
      case Q5_K: dequantize_row_k<Q5_K>(row, n_blocks, o); break;
      case Q6_K: dequantize_row_k<Q6_K>(row, n_blocks, o); break;
      case F16: dequantize_row_half<false>(reinterpret_cast<const uint16_t*>(row), K, o); break;
      case BF16: dequantize_row_half<true>(reinterpret_cast<const uint16_t*>(row), K, o); break;
      default: TORCH_CHECK(false, "dequantize: unsupported ggml type ", type);
    }
  }
}

// K-quant rows (N, row_bytes) of ggml `type` (Q4_K, Q5_K, Q6_K), N a multiple of 8 -> its x8
// layout (described above dot_groups_k_x8; formats.py has the same in PyTorch, ~40x slower).
torch::Tensor repack_k(torch::Tensor raw, int64_t type) {
  TORCH_CHECK(is_k_quant(type), "repack_k: Q4_K, Q5_K or Q6_K, got ggml type ", type);
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == torch::kUInt8 && raw.is_contiguous(),
              "repack_k: a contiguous 2-D uint8 tensor");
  const int64_t N = raw.size(0), row_bytes = raw.size(1), bb = block_bytes(type);
  TORCH_CHECK(N % 8 == 0 && row_bytes % bb == 0, "repack_k: rows in eights of whole blocks");
  const int64_t n_blocks = row_bytes / bb;
  auto out = torch::empty_like(raw);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N / 8 * n_blocks, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      const int64_t g = t / n_blocks, b = t % n_blocks;
      const uint8_t* rows[8];
      for (int r = 0; r < 8; r++) rows[r] = src + (8 * g + r) * row_bytes + b * bb;
      uint8_t* o = dst + g * 8 * row_bytes + b * 8 * bb;
      if (type == Q4_K) repack_k_block<Q4_K>(rows, o);
      else if (type == Q5_K) repack_k_block<Q5_K>(rows, o);
      else repack_k_block<Q6_K>(rows, o);
    }
  });
  return out;
}

// Dequantize rows: w (N, row_bytes) uint8 -> (N, K) float32.
torch::Tensor dequantize(torch::Tensor w, int64_t type) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8, "dequantize: w must be 2-D uint8");
  w = w.contiguous();
  const int64_t N = w.size(0), row_bytes = w.size(1), bb = block_bytes(type);
  TORCH_CHECK(row_bytes % bb == 0, "dequantize: row of ", row_bytes, " bytes is not whole blocks");
  TORCH_CHECK(!is_x8(type) || N % 8 == 0, "dequantize: a repacked matrix has rows in eights, got ",
              N);
  const int64_t K = row_bytes / bb * block_values(type);
  auto out = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    dequantize_rows_into(wp, row_bytes, type, K, n0, n1, op + n0 * K);
  });
  return out;
}
