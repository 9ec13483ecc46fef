// One decode step (one new token per sequence), from token ids to logits, in C++.
//
// This is model.py's forward pass for T == 1, for models whose projections are packed (GGUF
// block formats) and whose rolling cache is float32 or float16 (read and written with F16C). It
// exists because the Python path spends ~15 PyTorch ops per layer, about 180 us of dispatch per
// layer on a 2-core machine, plus ~40 small ops around the layers (cache planning, RoPE angles,
// embedding, final norm): for a small model that is more than its own matmuls. Here a step is
// one call.
//
// Row b of the batch appends token ids[b] at position start[b] of cache row rows[b]:
//   x     = embedding[ids[b]]
//   the slot it writes (start mod S) and the slots it may see: plan_step, RollingCache.begin's
//   arithmetic for one token
// then for each layer l (x: the row's residual stream, dim values):
//   a     = rms_norm(x) * norms[2l]
//   qkv   = a @ Wqkv^T              H query heads, then Hkv key heads, then Hkv value heads
//   rotate the pairs (2i, 2i+1) of every query and key head by (cos, sin) of the position's
//   angle i, read from row rope_rows[b] of the table rope (rope.py's rope_rotations' values)
//   store the key and value heads at the row's slot
//   o[h]  = softmax(q[h] . k[s] / sqrt(hd) over the slots s the mask allows)
//           weighted sum of v[s], reading kv head h / (H / Hkv) (grouped-query attention; the
//           H / Hkv query heads of a kv head are done together, reading its cache once)
//   x    += o @ Wo^T
//   a     = rms_norm(x) * norms[2l + 1]
//   g, u  = the two halves of a @ W13^T
//   x    += (silu(g) * u) @ W2^T
// and last logits = rms_norm(x) * final_norm @ head^T.
// Projection 4l .. 4l + 3 is Wqkv, Wo, W13, W2. Each is one packed matrix, or several stacked
// by rows (Stacked below: a GGUF file may store wq, wk and wv in different formats, as Q4_K_M
// files do on half of Mistral 7B's layers, whose wv is Q6_K). The embedding and the head are
// packed too, or float32 (type 0). The cache is written before attending, which is safe for a
// single new token (see cache.py).

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

// ---- attention ----
//
// A row's new query attends over its cached slots. The G query heads that share a kv head
// (grouped-query attention) are done together, so each key and value row is read once for the
// G heads. The slots are cut into chunks of kSlotChunk, and each (row, kv head, chunk) is one
// task with its own softmax statistics: the chunk's highest score m, the sum l of e^(score - m)
// and the unnormalised output o = sum e^(score - m) v. merge_chunks then combines a row's
// chunks in order (flash-decoding):
//   M = max_c m_c,   out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c
// With one chunk this is softmax itself (e^0 = 1). Chunks are a fixed number of slots, so a
// row's arithmetic depends neither on the batch nor on the thread count, and the slots of one
// long row spread over every thread.
constexpr int64_t kSlotChunk = 64;

// The sums of the 8 floats of each of p[0..7], as one vector in that order.
inline __m256 sum8(const __m256 p[8]) {
  // hadd pairs neighbours within each 128-bit half: a holds p[0..3]'s low-half sums, then
  // their high-half sums; b likewise for p[4..7].
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(p[0], p[1]), _mm256_hadd_ps(p[2], p[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(p[4], p[5]), _mm256_hadd_ps(p[6], p[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// q . k[j] for the 8 consecutive key rows k[0..7] (hd values each, hd % 8 == 0): eight
// accumulators reduced together, instead of one horizontal sum per score.
template <class C>
inline __m256 scores8(const float* q, const C* k, int64_t hd) {
  __m256 acc[8];
  for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < hd; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, load8(k + j * hd + i), acc[j]);
  }
  return sum8(acc);
}

// o (hd values) += sum of p[s] * V[s] over n value rows, 64 outputs at a time held in registers
// while the rows stream past; the last hd % 64 outputs with axpy.
template <class C>
void weighted_sum(const float* p, const C* V, int64_t n, int64_t hd, float* o) {
  int64_t i = 0;
  for (; i + 64 <= hd; i += 64) {
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_loadu_ps(o + i + 8 * j);
    for (int64_t s = 0; s < n; s++) {
      if (p[s] == 0.f) continue;
      const __m256 w = _mm256_set1_ps(p[s]);
      const C* v = V + s * hd + i;
      for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(w, load8(v + 8 * j), acc[j]);
    }
    for (int j = 0; j < 8; j++) _mm256_storeu_ps(o + i + 8 * j, acc[j]);
  }
  if (i == hd) return;
  for (int64_t s = 0; s < n; s++) {
    if (p[s] != 0.f) axpy(o + i, p[s], V + s * hd + i, hd - i);
  }
}

// One task: the G query heads q (G x hd, contiguous) over the n slots of one chunk, keys K and
// values V (n rows of hd) and mask (n bytes, 0 = hidden). Writes m[g], l[g] and o[g] (hd
// values, not yet divided by l[g]); a chunk with nothing visible gives m = -inf, l = 0, o = 0.
// p holds G * n floats.
template <class C>
void attend_chunk(const float* q, int64_t G, const C* K, const C* V, const uint8_t* mask,
                  int64_t n, int64_t hd, float* p, float* m, float* l, float* o) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; g++) {
    float* pg = p + g * n;
    const float* qg = q + g * hd;
    int64_t s = 0;
    if (hd % 8 == 0) {
      for (; s + 8 <= n; s += 8) _mm256_storeu_ps(pg + s, scores8(qg, K + s * hd, hd));
    }
    for (; s < n; s++) pg[s] = dot(qg, K + s * hd, hd);
    float best = neg_inf;
    for (s = 0; s < n; s++) {
      pg[s] = mask[s] ? pg[s] * scale : neg_inf;
      best = std::max(best, pg[s]);
    }
    float* og = o + g * hd;
    std::fill(og, og + hd, 0.f);
    m[g] = best;
    l[g] = 0.f;
    if (best == neg_inf) continue;
    const __m256 shift = _mm256_set1_ps(best);
    __m256 acc = _mm256_setzero_ps();
    for (s = 0; s + 8 <= n; s += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(pg + s), shift));  // -inf -> 0
      _mm256_storeu_ps(pg + s, e);
      acc = _mm256_add_ps(acc, e);
    }
    float total = hsum(acc);
    for (; s < n; s++) {
      pg[s] = pg[s] == neg_inf ? 0.f : std::exp(pg[s] - best);
      total += pg[s];
    }
    l[g] = total;
    weighted_sum(pg, V, n, hd, og);
  }
}

// out (G x hd) for one (row, kv head) from its chunks' m, l (n_chunks x G) and o
// (n_chunks x G x hd), combined in chunk order.
void merge_chunks(int64_t n_chunks, int64_t G, int64_t hd, const float* m, const float* l,
                  const float* o, float* out) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; g++) {
    float* og = out + g * hd;
    std::fill(og, og + hd, 0.f);
    float top = neg_inf;
    for (int64_t c = 0; c < n_chunks; c++) top = std::max(top, m[c * G + g]);
    if (top == neg_inf) continue;  // nothing visible (RollingCache never plans this)
    float total = 0.f;
    for (int64_t c = 0; c < n_chunks; c++) {
      const float mc = m[c * G + g];
      if (mc == neg_inf) continue;
      const float w = std::exp(mc - top);
      total += w * l[c * G + g];
      axpy(og, w, o + (c * G + g) * hd, hd);
    }
    const float inv = 1.f / total;
    for (int64_t i = 0; i < hd; i++) og[i] *= inv;
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

// ggml's type id for float32: embedding tables and output heads left unpacked (a checkpoint
// quantized at load packs only the layers' projections).
constexpr int64_t kF32 = 0;

// Checks a packed weight (see check_weight) or a float32 one: N rows of K values.
void check_matrix(const torch::Tensor& w, int64_t K, int64_t type, const char* what) {
  if (type != kF32) {
    check_weight(w, K, type, what);
    return;
  }
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.is_contiguous() &&
              w.size(1) == K, what, ": a float32 weight must be contiguous (N, ", K, ")");
}

// Row `id` of an embedding table as dim float32 values.
void embed_row(const torch::Tensor& table, int64_t type, int64_t id, int64_t dim, float* out) {
  if (type == kF32) {
    const float* row = table.data_ptr<float>() + id * dim;
    std::copy(row, row + dim, out);
    return;
  }
  dequantize_rows_into(table.data_ptr<uint8_t>(), table.size(1), type, dim, id, id + 1, out);
}

// y (M, N) = x (M, K) @ w.T, w packed (the integer kernel, as QuantLinear's decode path) or
// float32 (one dot product per weight row, the row read once for all M inputs).
void project(const float* x, int64_t M, int64_t K, const torch::Tensor& w, int64_t type,
             float* y) {
  const int64_t N = w.size(0);
  if (type != kF32) {
    qmatmul_into(x, M, K, w.data_ptr<uint8_t>(), N, w.size(1), type, y);
    return;
  }
  const float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      for (int64_t m = 0; m < M; m++) y[m * N + n] = dot(x + m * K, wp + n * K, K);
    }
  });
}

// The model's projections, each the matrices weights[first[p] .. first[p + 1]) (ggml types
// types[..]) stacked by rows: y = x @ [W_0; W_1; ...]^T puts part i's outputs after those of
// parts 0 .. i - 1.
struct Stacked {
  const std::vector<torch::Tensor>& weights;
  const std::vector<int64_t>& types;
  const std::vector<int64_t>& first;

  int64_t rows(int64_t p) const {
    int64_t n = 0;
    for (int64_t i = first[p]; i < first[p + 1]; i++) n += weights[i].size(0);
    return n;
  }

  // y (M, rows(p)) = x (M, K) @ projection p's matrices^T. With one part (or one row of x)
  // each part writes its outputs in place; else each goes through `scratch` to its columns.
  void project(const float* x, int64_t M, int64_t K, int64_t p, float* y,
               std::vector<float>& scratch) const {
    const int64_t N = rows(p);
    int64_t offset = 0;
    for (int64_t i = first[p]; i < first[p + 1]; i++) {
      const int64_t n = weights[i].size(0);
      if (M == 1 || first[p + 1] - first[p] == 1) {
        ::project(x, M, K, weights[i], types[i], y + offset);
      } else {
        scratch.resize(M * n);
        ::project(x, M, K, weights[i], types[i], scratch.data());
        for (int64_t m = 0; m < M; m++) {
          std::copy(scratch.data() + m * n, scratch.data() + (m + 1) * n, y + m * N + offset);
        }
      }
      offset += n;
    }
  }
};

// Where each sequence's new token goes and which slots it sees: RollingCache.begin's arithmetic
// for a one-token step (cache.py has a worked example). Row b of the batch is cache row row[b],
// has seen start[b] positions and appends n_new[b] tokens: 1, or 0 for a row that only pads
// the batch (it writes nothing and sees every slot; its output is ignored).
struct StepPlan {
  int64_t n_slots = 0;              // leading slots that may hold a position (max end, <= S)
  std::vector<int64_t> row, slot;   // cache row, and the slot written (-1: none)
  std::vector<uint8_t> mask;        // (B, n_slots): 1 where the new token may attend the slot
  std::vector<float> rope;          // (B, hd): (cos, sin) of pair i at 2i, for the token's position
};

StepPlan plan_step(const std::vector<int64_t>& rows, const std::vector<int64_t>& starts,
                   const std::vector<int64_t>& n_new, int64_t R, int64_t S, int64_t window,
                   const torch::Tensor& rope, const std::vector<int64_t>& rope_rows, int64_t hd) {
  const int64_t B = static_cast<int64_t>(rows.size());
  TORCH_CHECK(static_cast<int64_t>(starts.size()) == B && static_cast<int64_t>(n_new.size()) == B &&
              static_cast<int64_t>(rope_rows.size()) == B,
              "decode_step: rows, starts, n_new and rope_rows need one entry per sequence");
  TORCH_CHECK(rope.dim() == 3 && rope.scalar_type() == torch::kFloat32 && rope.is_contiguous() &&
              rope.size(1) * 2 == hd && rope.size(2) == 2,
              "decode_step: the rope table must be contiguous float32 (positions, hd / 2, 2)");
  StepPlan plan;
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(0 <= rows[b] && rows[b] < R, "decode_step: cache row ", rows[b], " out of range");
    TORCH_CHECK(starts[b] >= 0 && 0 <= rope_rows[b] && rope_rows[b] < rope.size(0),
                "decode_step: position ", starts[b], " has no row in the rope table");
    TORCH_CHECK(n_new[b] == 0 || n_new[b] == 1, "decode_step: one new token per row, or none");
    plan.n_slots = std::max(plan.n_slots, starts[b] + n_new[b]);
  }
  plan.n_slots = std::min(plan.n_slots, S);
  const int64_t n = plan.n_slots;
  plan.row = rows;
  plan.slot.assign(B, -1);
  plan.mask.assign(B * n, 1);
  plan.rope.resize(B * hd);
  const float* table = rope.data_ptr<float>();
  for (int64_t b = 0; b < B; b++) {
    const int64_t pos = starts[b], r = rope_rows[b];
    std::copy(table + r * hd, table + (r + 1) * hd, plan.rope.data() + b * hd);
    if (n_new[b] == 0) continue;
    plan.slot[b] = pos % S;
    for (int64_t s = 0; s < n; s++) {
      // The newest position congruent to s mod S among 0..pos (negative: never written).
      const int64_t key = pos - (((pos - s) % S) + S) % S;
      plan.mask[b * n + s] = key >= 0 && (window <= 0 || pos - key < window);
    }
  }
  return plan;
}

// Every layer over x (B, dim), in place, for the tokens `plan` places.
template <class C>
void run_layers(float* xp, int64_t B, int64_t dim, const StepPlan& plan,
                const std::vector<torch::Tensor>& norms, const Stacked& weights,
                torch::Tensor& k_cache, torch::Tensor& v_cache, int64_t H, double eps) {
  const int64_t L = k_cache.size(0), R = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t S = k_cache.size(3), hd = k_cache.size(4), n_slots = plan.n_slots;
  const int64_t q_width = H * hd, kv_width = Hkv * hd, qkv_width = q_width + 2 * kv_width;
  C* kc = k_cache.data_ptr<C>();
  C* vc = v_cache.data_ptr<C>();
  const int64_t* row = plan.row.data();
  const int64_t* slot = plan.slot.data();
  const uint8_t* mk = plan.mask.data();
  const float* cs = plan.rope.data();
  const int64_t hidden = weights.rows(2) / 2;
  std::vector<float> a(B * std::max(dim, hidden)), qkv(B * qkv_width), attn(B * q_width);
  std::vector<float> proj(B * dim), gate_up(B * 2 * hidden), scratch;
  // Attention's per-chunk softmax statistics and outputs (see attend_chunk).
  const int64_t G = H / Hkv, n_chunks = (n_slots + kSlotChunk - 1) / kSlotChunk;
  std::vector<float> part_m(B * Hkv * n_chunks * G), part_l(part_m.size());
  std::vector<float> part_o(part_m.size() * hd);

  auto residual_add = [&]() {
    for (int64_t i = 0; i < B * dim; i++) xp[i] += proj[i];
  };
  auto matmul = [&](const float* in, int64_t K, int64_t p, float* out) {
    weights.project(in, B, K, p, out, scratch);
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
    // Task t = ((b * Hkv) + h) * n_chunks + c: row b's query heads h*G .. h*G + G - 1 over
    // chunk c of its slots; then each (b, h) merges its chunks.
    at::parallel_for(0, B * Hkv * n_chunks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> p(G * kSlotChunk);
      for (int64_t t = t0; t < t1; t++) {
        const int64_t bh = t / n_chunks, b = bh / Hkv, h = bh % Hkv;
        const int64_t s0 = (t % n_chunks) * kSlotChunk;
        const int64_t kv = ((((l * R + row[b]) * Hkv + h) * S) + s0) * hd;
        attend_chunk(qkv.data() + b * qkv_width + h * G * hd, G, kc + kv, vc + kv,
                     mk + b * n_slots + s0, std::min(kSlotChunk, n_slots - s0), hd, p.data(),
                     part_m.data() + t * G, part_l.data() + t * G, part_o.data() + t * G * hd);
      }
    });
    at::parallel_for(0, B * Hkv, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t bh = t0; bh < t1; bh++) {
        const int64_t b = bh / Hkv, h = bh % Hkv, at = bh * n_chunks * G;
        merge_chunks(n_chunks, G, hd, part_m.data() + at, part_l.data() + at,
                     part_o.data() + at * hd, attn.data() + b * q_width + h * G * hd);
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
}

// The layers' weights against the model's shape: dim, H query and Hkv kv heads of hd values.
void check_layers(const std::vector<torch::Tensor>& norms, const Stacked& weights, int64_t dim,
                  int64_t H, int64_t Hkv, int64_t hd) {
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "DecodeModel: ", H, " heads do not group over ", Hkv,
              " kv heads");
  const int64_t L = static_cast<int64_t>(norms.size()) / 2;
  TORCH_CHECK(L > 0 && static_cast<int64_t>(norms.size()) == 2 * L &&
              static_cast<int64_t>(weights.first.size()) == 4 * L + 1,
              "DecodeModel: need 2 norms and 4 projections per layer");
  const int64_t q_width = H * hd, qkv_width = q_width + 2 * Hkv * hd;
  // each part of projection p: K inputs
  const auto check = [&](int64_t p, int64_t K, const char* what) {
    TORCH_CHECK(weights.first[p + 1] > weights.first[p], what, ": no matrix");
    for (int64_t i = weights.first[p]; i < weights.first[p + 1]; i++) {
      check_matrix(weights.weights[i], K, weights.types[i], what);
    }
  };
  const int64_t w13_rows = weights.rows(2);
  for (int64_t l = 0; l < L; l++) {
    TORCH_CHECK(norms[2 * l].numel() == dim && norms[2 * l + 1].numel() == dim &&
                norms[2 * l].scalar_type() == torch::kFloat32 &&
                norms[2 * l + 1].scalar_type() == torch::kFloat32 &&
                norms[2 * l].is_contiguous() && norms[2 * l + 1].is_contiguous(),
                "DecodeModel: norm weights must be contiguous float32 of size dim");
    check(4 * l, dim, "DecodeModel (wqkv)");
    check(4 * l + 1, q_width, "DecodeModel (wo)");
    check(4 * l + 2, dim, "DecodeModel (w13)");
    TORCH_CHECK(weights.rows(4 * l) == qkv_width && weights.rows(4 * l + 1) == dim &&
                weights.rows(4 * l + 2) == w13_rows && w13_rows % 2 == 0,
                "DecodeModel: projection shapes do not match the model's heads");
    check(4 * l + 3, w13_rows / 2, "DecodeModel (w2)");
    TORCH_CHECK(weights.rows(4 * l + 3) == dim, "DecodeModel: w2 must have dim rows");
  }
}

// first[p]: where projection p's matrices start in the weights (parts[p] of them; no parts:
// one each).
std::vector<int64_t> part_offsets(const std::vector<int64_t>& parts, int64_t n_weights) {
  std::vector<int64_t> first{0};
  if (parts.empty()) {
    for (int64_t i = 1; i <= n_weights; i++) first.push_back(i);
    return first;
  }
  for (int64_t n : parts) {
    TORCH_CHECK(n > 0, "DecodeModel: a projection needs at least one matrix");
    first.push_back(first.back() + n);
  }
  TORCH_CHECK(first.back() == n_weights, "DecodeModel: parts add up to ", first.back(),
              " matrices, but ", n_weights, " were given");
  return first;   // check_layers checks there are 4 projections per layer
}

}  // namespace

DecodeModel::DecodeModel(std::vector<torch::Tensor> norms, std::vector<torch::Tensor> weights,
                         std::vector<int64_t> types, torch::Tensor embedding,
                         int64_t embedding_type, torch::Tensor final_norm, torch::Tensor head,
                         int64_t head_type, int64_t n_heads, int64_t n_kv_heads,
                         int64_t head_dim, double eps, const std::vector<int64_t>& parts)
    : norms_(std::move(norms)), weights_(std::move(weights)), types_(std::move(types)),
      first_(part_offsets(parts, static_cast<int64_t>(weights_.size()))),
      embedding_(std::move(embedding)), embedding_type_(embedding_type),
      final_norm_(std::move(final_norm)), head_(std::move(head)), head_type_(head_type),
      n_heads_(n_heads), n_kv_heads_(n_kv_heads), head_dim_(head_dim), eps_(eps) {
  TORCH_CHECK(final_norm_.dim() == 1 && final_norm_.scalar_type() == torch::kFloat32 &&
              final_norm_.is_contiguous(),
              "DecodeModel: the final norm weight must be contiguous float32");
  const int64_t dim = final_norm_.numel();
  check_matrix(embedding_, dim, embedding_type_, "DecodeModel (embedding)");
  check_matrix(head_, dim, head_type_, "DecodeModel (output head)");
  TORCH_CHECK(types_.size() == weights_.size(), "DecodeModel: one ggml type per matrix");
  check_layers(norms_, Stacked{weights_, types_, first_}, dim, n_heads_, n_kv_heads_, head_dim_);
}

torch::Tensor DecodeModel::step(torch::Tensor tokens, const std::vector<int64_t>& rows,
                                const std::vector<int64_t>& starts,
                                const std::vector<int64_t>& n_new, int64_t window,
                                torch::Tensor rope, const std::vector<int64_t>& rope_rows,
                                torch::Tensor k_cache,
                                torch::Tensor v_cache) const {
  const auto kind = k_cache.scalar_type();
  const int64_t L = static_cast<int64_t>(norms_.size()) / 2;
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == kind &&
              (kind == torch::kFloat32 || kind == torch::kFloat16) && k_cache.size(0) == L &&
              k_cache.size(2) == n_kv_heads_ && k_cache.size(4) == head_dim_,
              "decode_step: caches must be contiguous float32 or float16 tensors of shape "
              "(layers, rows, kv heads, slots, head_dim) matching the model");
  tokens = tokens.to(torch::kInt64).contiguous().view(-1);
  const int64_t B = tokens.size(0), vocab = embedding_.size(0), dim = final_norm_.numel();
  TORCH_CHECK(static_cast<int64_t>(rows.size()) == B, "decode_step: one cache row per token");
  const int64_t* ids = tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(0 <= ids[b] && ids[b] < vocab, "decode_step: token id ", ids[b],
                " outside the vocabulary of ", vocab);
  }
  const StepPlan plan = plan_step(rows, starts, n_new, k_cache.size(1), k_cache.size(3), window,
                                  rope, rope_rows, head_dim_);

  std::vector<float> x(B * dim), normed(B * dim);
  for (int64_t b = 0; b < B; b++) {
    embed_row(embedding_, embedding_type_, ids[b], dim, &x[b * dim]);
  }
  const Stacked weights{weights_, types_, first_};
  if (kind == torch::kFloat16) {
    run_layers<at::Half>(x.data(), B, dim, plan, norms_, weights, k_cache, v_cache, n_heads_,
                         eps_);
  } else {
    run_layers<float>(x.data(), B, dim, plan, norms_, weights, k_cache, v_cache, n_heads_, eps_);
  }
  const float* w_norm = final_norm_.data_ptr<float>();
  for (int64_t b = 0; b < B; b++) rms_norm(&x[b * dim], w_norm, dim, eps_, &normed[b * dim]);
  auto logits = torch::empty({B, head_.size(0)}, torch::kFloat32);
  project(normed.data(), B, dim, head_, head_type_, logits.data_ptr<float>());
  return logits;
}
