// Nearest-code search on CPU: for x (N, D) and a codebook c (K, D),
//   idx[n]    = argmin_k ||x_n - c_k||^2 = argmin_k (||c_k||^2 - 2 x_n . c_k)   (lowest k wins ties)
//   sqdist[n] = ||x_n - c_idx[n]||^2, recomputed directly from the difference (no cancellation)
// The N x K distance matrix is never built: threads own blocks of RB rows; each block streams the
// codebook in tiles of KT codes, gets the (RB x KT) dot products from one BLAS call (at::mm_out into
// a thread-local buffer that stays in cache) and folds them into a running argmin right away. Extra
// memory: the fp32 codebook copy (none for fp32 input), ||c||^2 (K,) and per-thread RB x (D + KT) floats.
// All arithmetic is fp32 for fp32/bf16/fp16 inputs.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t MAX_RB = 256;  // rows per block (the BLAS call's M; blocks are the unit of parallel work)
constexpr int64_t KT = 2048;     // codes per tile. RB=256, KT=2048 measured best of RB 64-512 x KT 128-4096 on
                                 // a 2-core EPYC: fewer, larger BLAS calls amortise packing and dispatch
                                 // (scores: 2 MiB per thread, L2/L3-resident)
constexpr int64_t LANES = 16;  // independent running minima per row (two AVX2 vectors), merged per tile

// x row r (any strides, any accepted dtype) -> dst[0 .. D) in fp32.
template <typename scalar_t>
void load_row(const scalar_t* x, int64_t r, int64_t sx0, int64_t sx1, int64_t D, float* dst) {
  const scalar_t* row = x + r * sx0;
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(row[d * sx1]);
}

// Folds one row of dot products s[0 .. kt) (codes k0 ..) into (best, best_idx): score = ||c||^2 - 2 x.c.
// LANES running minima with a strict '<' keep each lane's first minimum; the lane merge prefers the
// lower index on equal scores, and tiles arrive in increasing k, so the lowest index wins every tie.
void fold_row(const float* s, const float* csq, int64_t k0, int64_t kt, float& best, int64_t& best_idx) {
  float bv[LANES];
  int32_t bi[LANES];
  std::fill(bv, bv + LANES, std::numeric_limits<float>::infinity());
  std::fill(bi, bi + LANES, 0);
  const int64_t kfull = kt - kt % LANES;
  for (int64_t k = 0; k < kfull; k += LANES) {
#pragma omp simd
    for (int64_t j = 0; j < LANES; ++j) {
      const float v = csq[k + j] - 2.0f * s[k + j];
      const bool lt = v < bv[j];
      bv[j] = lt ? v : bv[j];
      bi[j] = lt ? static_cast<int32_t>(k + j) : bi[j];
    }
  }
  float tile_best = std::numeric_limits<float>::infinity();
  int64_t tile_idx = 0;
  for (int64_t j = 0; j < LANES; ++j) {
    if (bv[j] < tile_best || (bv[j] == tile_best && bi[j] < tile_idx)) {
      tile_best = bv[j];
      tile_idx = bi[j];
    }
  }
  for (int64_t k = kfull; k < kt; ++k) {  // tail indices exceed every lane's, so strict '<' keeps ties low
    const float v = csq[k] - 2.0f * s[k];
    if (v < tile_best) {
      tile_best = v;
      tile_idx = k;
    }
  }
  if (tile_best < best) {
    best = tile_best;
    best_idx = k0 + tile_idx;
  }
}

// Rows per block: MAX_RB, or fewer when that would leave threads idle (4 blocks per thread).
int64_t rows_per_block(int64_t N) {
  const int64_t want = (N + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  return std::clamp<int64_t>((want + 15) / 16 * 16, 16, MAX_RB);
}

template <typename scalar_t>
void nearest(const at::Tensor& x, const at::Tensor& cb, const float* csq, int64_t* idx, float* dist) {
  const int64_t N = x.size(0), D = x.size(1), K = cb.size(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const float* cp = cb.data_ptr<float>();
  const int64_t RB = rows_per_block(N);
  at::parallel_for(0, (N + RB - 1) / RB, 1, [&](int64_t b0, int64_t b1) {
    // x rows and scores in torch-allocated buffers, so memory profilers see them too
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    at::Tensor xbuf_t = at::empty({RB, D}, f32), sbuf_t = at::empty({RB, std::min(K, KT)}, f32);
    float* xbuf = xbuf_t.data_ptr<float>();
    float* sbuf = sbuf_t.data_ptr<float>();
    std::vector<float> best(RB);
    std::vector<int64_t> best_idx(RB);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * RB, nr = std::min(RB, N - r0);
      for (int64_t r = 0; r < nr; ++r) load_row(xp, r0 + r, sx0, sx1, D, xbuf + r * D);
      const at::Tensor xt = at::from_blob(xbuf, {nr, D}, f32);  // (nr, D)
      std::fill(best.begin(), best.end(), std::numeric_limits<float>::infinity());
      std::fill(best_idx.begin(), best_idx.end(), int64_t{0});
      for (int64_t k0 = 0; k0 < K; k0 += KT) {
        const int64_t kt = std::min(KT, K - k0);
        at::Tensor st = at::from_blob(sbuf, {nr, kt}, f32);  // (nr, kt) = x . c^T
        at::mm_out(st, xt, at::from_blob(const_cast<float*>(cp) + k0 * D, {kt, D}, f32).t());
        for (int64_t r = 0; r < nr; ++r) fold_row(sbuf + r * kt, csq + k0, k0, kt, best[r], best_idx[r]);
      }
      for (int64_t r = 0; r < nr; ++r) {  // sqdist from the difference itself: exact to fp32 rounding
        const float* xr = xbuf + r * D;
        const float* cr = cp + best_idx[r] * D;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += (xr[d] - cr[d]) * (xr[d] - cr[d]);
        idx[r0 + r] = best_idx[r];
        dist[r0 + r] = acc;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> vq_nearest(const at::Tensor& x, const at::Tensor& codebook) {
  TORCH_CHECK(x.dim() == 2, "vq_nearest: x must be (N, D), got ", x.sizes());
  TORCH_CHECK(codebook.dim() == 2 && codebook.size(0) > 0 && codebook.size(1) == x.size(1),
              "vq_nearest: codebook must be (K >= 1, D=", x.size(1), "), got ", codebook.sizes());
  TORCH_CHECK(x.scalar_type() == codebook.scalar_type(), "vq_nearest: x and codebook dtypes differ");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "vq_nearest: x must be float32, bfloat16 or float16, got ", t);
  const int64_t N = x.size(0), K = codebook.size(0), D = x.size(1);
  at::Tensor idx = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {idx, dist};
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();  // (K, D) fp32: a no-op for fp32 input
  const at::Tensor csq_t = at::empty({K}, cb.options());  // ||c_k||^2
  float* csq = csq_t.data_ptr<float>();
  const float* cp = cb.data_ptr<float>();
  at::parallel_for(0, K, 1024, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += cp[k * D + d] * cp[k * D + d];
      csq[k] = acc;
    }
  });
  switch (t) {
    case at::kFloat: nearest<float>(x, cb, csq, idx.data_ptr<int64_t>(), dist.data_ptr<float>()); break;
    case at::kBFloat16:
      nearest<c10::BFloat16>(x, cb, csq, idx.data_ptr<int64_t>(), dist.data_ptr<float>());
      break;
    default: nearest<c10::Half>(x, cb, csq, idx.data_ptr<int64_t>(), dist.data_ptr<float>()); break;
  }
  return {idx, dist};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastdae_cpp, m) {
  m.def("vq_nearest(Tensor x, Tensor codebook) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdae_cpp, CPU, m) {
  m.impl("vq_nearest", &vq_nearest);
}
