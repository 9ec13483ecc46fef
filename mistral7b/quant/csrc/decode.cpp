// One decode step (one new token per sequence) through every transformer layer, in C++.
//
// This is model.py's forward pass for T == 1, for models whose projections are packed (GGUF
// block formats) and whose rolling cache is float32 or float16 (read and written with F16C). It exists because the Python path spends
// ~15 PyTorch ops per layer, about 180 us of dispatch per layer on a 2-core machine: for a
// small model that is more than the layer's own matmuls. Here a step is one call.
//
// For each layer l and each of the B sequences (x[b]: its residual stream, dim values):
//   a     = rms_norm(x) * norms[2l]
//   qkv   = a @ Wqkv^T              H query heads, then Hkv key heads, then Hkv value heads
//   rotate the pairs (2i, 2i+1) of every query and key head by rope[b, i] = (cos, sin)
//   store the key and value heads at slot write_slot[b] of cache row rows[b] (none if < 0)
//   o[h]  = softmax(q[h] . k[s] / sqrt(hd) over the slots s < n_slots that mask[b, s] allows)
//           weighted sum of v[s], reading kv head h / (H / Hkv) (grouped-query attention; the
//           H / Hkv query heads of a kv head are done together, reading its cache once)
//   x    += o @ Wo^T
//   a     = rms_norm(x) * norms[2l + 1]
//   g, u  = the two halves of a @ W13^T
//   x    += (silu(g) * u) @ W2^T
// weights[4l .. 4l + 3] are Wqkv, Wo, W13, W2 in the ggml types types[4l .. 4l + 3]. The cache
// is written before attending, which RollingCache guarantees is safe for a single new token (it
// plans the slots and the mask; see cache.py).

#include "kernels.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

// The cache holds float32 or float16 (at::Half) values; these read and write either.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float load1(const float* p) { return *p; }
inline float load1(const at::Half* p) { return static_cast<float>(*p); }

// n floats into the cache; float16 rounds to nearest even, as Tensor.to(torch.float16) does.
inline void store(const float* src, int64_t n, float* dst) { std::copy(src, src + n, dst); }
inline void store(const float* src, int64_t n, at::Half* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; i++) dst[i] = static_cast<at::Half>(src[i]);
}

template <class A, class B>
float dot(const A* a, const B* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(load8(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(load8(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(load8(a + i), load8(b + i), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; i++) s += load1(a + i) * load1(b + i);
  return s;
}

// y += a * x
template <class C>
void axpy(float* y, float a, const C* x, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < n; i++) y[i] += a * load1(x + i);
}

// e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-7 polynomial
// (relative error ~1e-7), times 2^n built in the exponent bits. Exactly 0 below -87.3 (and for
// -inf), where float32 would go subnormal.
inline __m256 exp8(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);   // ln2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r),
                                   _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(two_n)));
}

// Same rule as torch.nn.functional.rms_norm: x / sqrt(mean(x^2) + eps) * w.
void rms_norm(const float* x, const float* w, int64_t dim, double eps, float* out) {
  const float scale = 1.f / std::sqrt(dot(x, x, dim) / static_cast<float>(dim) +
                                      static_cast<float>(eps));
  for (int64_t i = 0; i < dim; i++) out[i] = x[i] * scale * w[i];
}

// The pairs (2i, 2i+1) of `heads` heads of hd values, rotated by (cos, sin) = cs[i].
void rotate(float* v, int64_t heads, int64_t hd, const float* cs) {
  for (int64_t h = 0; h < heads; h++) {
    float* p = v + h * hd;
    for (int64_t i = 0; i < hd / 2; i++) {
      const float re = p[2 * i], im = p[2 * i + 1], c = cs[2 * i], s = cs[2 * i + 1];
      p[2 * i] = re * c - im * s;
      p[2 * i + 1] = re * s + im * c;
    }
  }
}

// Softmax attention of the G query heads of one group (q: G heads of hd values, contiguous)
// against the n slots of their shared key/value head K, V (grouped-query attention): each key
// and value row is read once for all G heads. Slots whose mask byte is 0 are skipped. Writes G
// heads of hd values to out; `scores` holds G * n floats.
template <class C>
void attend_group(const float* q, int64_t G, const C* K, const C* V, const bool* mask,
                  int64_t n, int64_t hd, float* scores, float* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> best(G, neg_inf);
  for (int64_t s = 0; s < n; s++) {
    for (int64_t g = 0; g < G; g++) {
      const float v = mask[s] ? dot(q + g * hd, K + s * hd, hd) * scale : neg_inf;
      scores[g * n + s] = v;
      best[g] = std::max(best[g], v);
    }
  }
  std::fill(out, out + G * hd, 0.f);
  std::vector<float> inv(G, 0.f);
  for (int64_t g = 0; g < G; g++) {
    if (best[g] == neg_inf) continue;  // nothing visible (RollingCache never plans this)
    float* sc = scores + g * n;
    const __m256 shift = _mm256_set1_ps(best[g]);
    __m256 acc = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + s), shift));
      _mm256_storeu_ps(sc + s, e);
      acc = _mm256_add_ps(acc, e);
    }
    float total = hsum(acc);
    for (; s < n; s++) {
      sc[s] = sc[s] == neg_inf ? 0.f : std::exp(sc[s] - best[g]);
      total += sc[s];
    }
    inv[g] = 1.f / total;
  }
  for (int64_t s = 0; s < n; s++) {
    if (!mask[s]) continue;
    for (int64_t g = 0; g < G; g++) {
      const float p = scores[g * n + s];
      if (p != 0.f) axpy(out + g * hd, p, V + s * hd, hd);
    }
  }
  for (int64_t g = 0; g < G; g++) {
    for (int64_t i = 0; i < hd; i++) out[g * hd + i] *= inv[g];
  }
}

// out[i] = silu(g[i]) * u[i], silu(g) = g / (1 + e^-g); eight at a time with exp8 (std::exp,
// one value at a time, took ~12 us of each layer of the default model).
void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)),
                                            _mm256_loadu_ps(u + i)));
  }
  for (; i < n; i++) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

}  // namespace

namespace {

template <class C>
torch::Tensor decode_layers_impl(torch::Tensor x, const std::vector<torch::Tensor>& norms,
                                 const std::vector<torch::Tensor>& weights,
                                 const std::vector<int64_t>& types, torch::Tensor k_cache,
                                 torch::Tensor v_cache, torch::Tensor rows,
                                 torch::Tensor write_slot, torch::Tensor mask, torch::Tensor rope,
                                 int64_t n_heads, double eps) {
  const int64_t L = k_cache.size(0), R = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t S = k_cache.size(3), hd = k_cache.size(4);
  const int64_t B = x.size(0), dim = x.size(1), H = n_heads;
  TORCH_CHECK(H % Hkv == 0, "decode_layers: ", H, " heads do not group over ", Hkv, " kv heads");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * L &&
              static_cast<int64_t>(weights.size()) == 4 * L &&
              static_cast<int64_t>(types.size()) == 4 * L,
              "decode_layers: need 2 norms and 4 weights per layer");
  rows = rows.to(torch::kInt64).contiguous();
  write_slot = write_slot.to(torch::kInt64).contiguous();
  mask = mask.to(torch::kBool).contiguous();
  rope = rope.to(torch::kFloat32).contiguous();
  TORCH_CHECK(rows.numel() == B && write_slot.numel() == B, "decode_layers: one row per sequence");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) <= S,
              "decode_layers: mask must be (B, n_slots <= slots)");
  TORCH_CHECK(rope.numel() == B * hd, "decode_layers: rope must be (B, hd / 2, 2)");
  const int64_t n_slots = mask.size(1);
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* slot = write_slot.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(0 <= row[b] && row[b] < R && slot[b] < S, "decode_layers: row/slot out of range");
  }
  const int64_t q_width = H * hd, kv_width = Hkv * hd, qkv_width = q_width + 2 * kv_width;
  for (int64_t l = 0; l < L; l++) {
    TORCH_CHECK(norms[2 * l].numel() == dim && norms[2 * l + 1].numel() == dim &&
                norms[2 * l].scalar_type() == torch::kFloat32 &&
                norms[2 * l + 1].scalar_type() == torch::kFloat32 &&
                norms[2 * l].is_contiguous() && norms[2 * l + 1].is_contiguous(),
                "decode_layers: norm weights must be contiguous float32 of size dim");
    check_weight(weights[4 * l], dim, types[4 * l], "decode_layers (wqkv)");
    check_weight(weights[4 * l + 1], q_width, types[4 * l + 1], "decode_layers (wo)");
    check_weight(weights[4 * l + 2], dim, types[4 * l + 2], "decode_layers (w13)");
    TORCH_CHECK(weights[4 * l].size(0) == qkv_width && weights[4 * l + 1].size(0) == dim &&
                weights[4 * l + 2].size(0) == weights[2].size(0) && weights[2].size(0) % 2 == 0,
                "decode_layers: projection shapes do not match the cache's heads");
    check_weight(weights[4 * l + 3], weights[4 * l + 2].size(0) / 2, types[4 * l + 3],
                 "decode_layers (w2)");
    TORCH_CHECK(weights[4 * l + 3].size(0) == dim, "decode_layers: w2 must have dim rows");
  }

  x = x.contiguous().clone();
  float* xp = x.data_ptr<float>();
  C* kc = k_cache.data_ptr<C>();
  C* vc = v_cache.data_ptr<C>();
  const bool* mk = mask.data_ptr<bool>();
  const float* cs = rope.data_ptr<float>();
  const int64_t hidden = weights[2].size(0) / 2;
  std::vector<float> a(B * std::max(dim, hidden)), qkv(B * qkv_width), attn(B * q_width);
  std::vector<float> proj(B * dim), gate_up(B * 2 * hidden);

  auto residual_add = [&]() {
    for (int64_t i = 0; i < B * dim; i++) xp[i] += proj[i];
  };
  auto matmul = [&](const float* in, int64_t K, int64_t w, float* out) {
    const torch::Tensor& wt = weights[w];
    qmatmul_into(in, B, K, wt.data_ptr<uint8_t>(), wt.size(0), wt.size(1), types[w], out);
  };

  for (int64_t l = 0; l < L; l++) {
    // ---- attention ----
    const float* w_norm = norms[2 * l].data_ptr<float>();
    for (int64_t b = 0; b < B; b++) rms_norm(xp + b * dim, w_norm, dim, eps, a.data() + b * dim);
    matmul(a.data(), dim, 4 * l, qkv.data());
    for (int64_t b = 0; b < B; b++) {
      float* q = qkv.data() + b * qkv_width;
      rotate(q, H + Hkv, hd, cs + b * hd);          // the query heads and then the key heads
      if (slot[b] < 0) continue;
      for (int64_t h = 0; h < Hkv; h++) {
        const int64_t at = (((l * R + row[b]) * Hkv + h) * S + slot[b]) * hd;
        store(q + q_width + h * hd, hd, kc + at);
        store(q + q_width + kv_width + h * hd, hd, vc + at);
      }
    }
    const int64_t G = H / Hkv;                      // query heads per kv head
    at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scores(G * n_slots);
      for (int64_t t = t0; t < t1; t++) {
        const int64_t b = t / Hkv, h = t % Hkv;     // query heads h*G .. h*G + G - 1
        const int64_t kv = (((l * R + row[b]) * Hkv + h) * S) * hd;
        attend_group(qkv.data() + b * qkv_width + h * G * hd, G, kc + kv, vc + kv,
                     mk + b * n_slots, n_slots, hd, scores.data(),
                     attn.data() + b * q_width + h * G * hd);
      }
    });
    matmul(attn.data(), q_width, 4 * l + 1, proj.data());
    residual_add();

    // ---- feed-forward ----
    const float* f_norm = norms[2 * l + 1].data_ptr<float>();
    for (int64_t b = 0; b < B; b++) rms_norm(xp + b * dim, f_norm, dim, eps, a.data() + b * dim);
    matmul(a.data(), dim, 4 * l + 2, gate_up.data());
    for (int64_t b = 0; b < B; b++) {
      const float* g = gate_up.data() + b * 2 * hidden;
      silu_mul(g, g + hidden, hidden, a.data() + b * hidden);
    }
    matmul(a.data(), hidden, 4 * l + 3, proj.data());
    residual_add();
  }
  return x;
}

}  // namespace

torch::Tensor decode_layers(torch::Tensor x, const std::vector<torch::Tensor>& norms,
                            const std::vector<torch::Tensor>& weights,
                            const std::vector<int64_t>& types, torch::Tensor k_cache,
                            torch::Tensor v_cache, torch::Tensor rows, torch::Tensor write_slot,
                            torch::Tensor mask, torch::Tensor rope, int64_t n_heads, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "decode_layers: x (B, dim) fp32");
  const auto kind = k_cache.scalar_type();
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == kind &&
              (kind == torch::kFloat32 || kind == torch::kFloat16),
              "decode_layers: caches must be contiguous float32 or float16 tensors of shape "
              "(layers, rows, kv heads, slots, head_dim)");
  if (kind == torch::kFloat16) {
    return decode_layers_impl<at::Half>(x, norms, weights, types, k_cache, v_cache, rows,
                                        write_slot, mask, rope, n_heads, eps);
  }
  return decode_layers_impl<float>(x, norms, weights, types, k_cache, v_cache, rows, write_slot,
                                   mask, rope, n_heads, eps);
}
