// The pre-fill matmul: y (M, N) = x (M, K) @ W.T for many rows of x (a prompt), with W packed
// in any format qmatmul.cpp reads.
//
// Dequantizing the whole of W and handing it to BLAS writes 4 bytes a weight to memory and
// reads them back: for the default model that is ~425 MB per pre-fill, 12-17% of its time.
// Here each thread takes a panel of a few weight rows at a time, dequantizes it into a buffer
// that stays in its L2 cache, and multiplies every row of x with it in registers:
//
//   for each panel of P weight rows (threads share the panels):
//     dequantize rows n0 .. n0+P-1 into buf (P x K float32)
//     for each block of 4 rows of x:
//       for each 3 rows of buf: the 4 x 3 dot products over all of K
//
// A tile keeps its 12 dot products in 12 AVX registers of 8 partial sums (lane i sums the
// products at k = i mod 8, in k order), loads 4 x vectors and 3 weight vectors per 8 k, and adds
// the 8 lanes up at the end. So y[m, n] is computed the same way whatever M is, wherever row m
// falls in a tile and however the panels are shared: a prompt's rows do not depend on the batch
// or the thread count. (They do differ from BLAS's and from the 16-bit integer kernel's rounding,
// by float32 summation order.)
//
// Measured on an AMD EPYC (Zen 3, AVX2, 2 cores at 2.45 GHz): a tile whose data sit in L1 runs at
// the FMA peak (77 GFLOP/s a core); with the panel in L2, ~60 a core; the whole kernel ~119 on
// 2 cores at 128 rows, against ~86 for dequantize + MKL on the default model and ~48 at Mistral
// 7B's shapes (benchmarks/prefill_matmul.py). Splitting K into L1-sized chunks, or looping over
// weight tiles outside the x blocks, measured slower.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int kTileRows = 4;   // rows of x per tile
constexpr int kTileCols = 3;   // weight rows per tile: 12 accumulators + 3 weights + 1 x = 16

// Weight rows per panel: as many as keep the panel within ~192 KB (it stays in L2 while the rows
// of x pass, 4 at a time, through L1), a multiple of kTileCols, between 3 and 24.
int64_t panel_rows(int64_t K) {
  const int64_t fit = (192 * 1024) / (4 * K);
  return std::clamp<int64_t>(fit / kTileCols * kTileCols, kTileCols, 24);
}

// y[i, j] (stride ldy) = x row i . w row j, for MR rows of x (stride ldx) and NR rows of w
// (stride K). Not inlined: inlined into its callers, GCC 12 spilled the accumulators to the stack
// on every iteration.
#define UNROLL _Pragma("GCC unroll 8")
template <int MR, int NR>
__attribute__((noinline)) void tile(const float* x, int64_t ldx, const float* w, int64_t K,
                                    float* y, int64_t ldy) {
  __m256 acc[MR][NR];
  UNROLL for (int i = 0; i < MR; i++) {
    UNROLL for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[NR];
    UNROLL for (int j = 0; j < NR; j++) wv[j] = _mm256_loadu_ps(w + j * K + k);
    UNROLL for (int i = 0; i < MR; i++) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      UNROLL for (int j = 0; j < NR; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  UNROLL for (int i = 0; i < MR; i++) {
    UNROLL for (int j = 0; j < NR; j++) {
      float s = hsum(acc[i][j]);
      for (int64_t t = k; t < K; t++) s += x[i * ldx + t] * w[j * K + t];  // K % 8 (F16/BF16)
      y[i * ldy + j] = s;
    }
  }
}

// The tile for mr <= kTileRows rows of x and nr <= kTileCols weight rows.
template <int MR>
inline void tile_cols(int nr, const float* x, int64_t ldx, const float* w, int64_t K, float* y,
                      int64_t ldy) {
  switch (nr) {
    case 3: tile<MR, 3>(x, ldx, w, K, y, ldy); break;
    case 2: tile<MR, 2>(x, ldx, w, K, y, ldy); break;
    default: tile<MR, 1>(x, ldx, w, K, y, ldy); break;
  }
}

inline void any_tile(int mr, int nr, const float* x, int64_t ldx, const float* w, int64_t K,
                     float* y, int64_t ldy) {
  switch (mr) {
    case 4: tile_cols<4>(nr, x, ldx, w, K, y, ldy); break;
    case 3: tile_cols<3>(nr, x, ldx, w, K, y, ldy); break;
    case 2: tile_cols<2>(nr, x, ldx, w, K, y, ldy); break;
    default: tile_cols<1>(nr, x, ldx, w, K, y, ldy); break;
  }
}

}  // namespace

void prefill_matmul_into(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t N,
                         int64_t row_bytes, int64_t type, float* yp) {
  const int64_t P = panel_rows(K);
  const int64_t n_panels = (N + P - 1) / P;
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> buf(P * K);
    for (int64_t p = p0; p < p1; p++) {
      const int64_t n0 = p * P, n1 = std::min(N, n0 + P);
      dequantize_rows_into(wp, row_bytes, type, K, n0, n1, buf.data());
      for (int64_t m = 0; m < M; m += kTileRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kTileRows, M - m));
        for (int64_t n = n0; n < n1; n += kTileCols) {
          const int nr = static_cast<int>(std::min<int64_t>(kTileCols, n1 - n));
          any_tile(mr, nr, xp + m * K, K, buf.data() + (n - n0) * K, K, yp + m * N + n, N);
        }
      }
    }
  });
}

torch::Tensor prefill_matmul(torch::Tensor x, torch::Tensor w, int64_t type) {
  return matmul_tensor(x, w, type, "prefill_matmul", prefill_matmul_into);
}
