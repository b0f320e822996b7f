// Nearest-code search on the AMX tile unit: a bf16 coarse pass plus an exact fp32 re-rank.
// vq.cpp includes this file once, inside namespace amx under `#pragma GCC target("amx-tile,amx-bf16,
// avx512...")`, after <immintrin.h>, ATen and the standard headers (none are included here), and calls
// it only where cpu_isa() is amx (the OS granted the tile state) and D >= AMX_MIN_D.
//
// Coarse pass. x rows and codes are rounded to bf16 (round to nearest even); a block of BM = 32 rows
// sweeps the codebook BN = 32 codes at a time: 2 A tiles (16 rows x 32 bf16 of x) x 2 B tiles (16 dim
// pairs x 16 codes, the VNNI layout) into 4 C tiles of fp32 dot products, TDPBF16PS per 32 dims. The C
// tiles go to a 4 KiB buffer, and AVX-512 folds s = ||c||^2 / 2 - x.c into per-row, per-lane (32 lanes:
// code mod 32) running minima, the lane's second minimum and the lane minimum's code (strict '<': in
// increasing code order a lane keeps its lowest-index minimum).
//
// Re-rank (why the result is exact). Every coarse score is within E of the exact score
// S_k = ||c_k||^2 / 2 - x.c_k, where, with u = 2^-8 (bf16's unit roundoff), |x| = ||x||, cm = max_k ||c_k||:
//   E = (2u + u^2) |x| cm                       (the bf16 rounding of x and c; their products are exact in fp32)
//     + (D + 2) 2^-24 (cm^2 / 2 + 1.01 |x| cm)  (fp32 accumulation in the tile unit, and ||c||^2 / 2)
//     + (D + 4) 2^-24 (|x| + cm)^2 / 2          (the fp32 distances the re-rank compares, d = |x|^2 + 2 S)
// (x 1.25, plus a tiny absolute term for the unit's flushed denormals). So a code whose coarse score is
// more than 2E above the row's coarse minimum m has an fp32 distance above some other code's: it can
// be neither the fp32 minimum nor tied with it. The candidates are the lane minima <= m + 2E; if a lane's
// second minimum is <= m + 2E too, that lane may hide more candidates, and every code of that lane is
// a candidate instead (near ties, duplicate codes: slower, still exact). Each candidate's distance
// is computed in fp32 from the fp32 vectors (`exact_dist`, fixed order), and the smallest wins, the
// lowest code on ties. The chosen code's fp32 distance is therefore the minimum of exact_dist over all
// codes, and sqdist is that distance.

constexpr int64_t TM = 16;  // rows per A tile / C tile
constexpr int64_t TN = 16;  // codes per B tile / lanes per row
constexpr int64_t TK = 32;  // bf16 per tile row (64 bytes): dims per TDPBF16PS
constexpr int64_t BM = 2 * TM;  // rows per block
constexpr int64_t BN = 2 * TN;  // codes per step = lanes per row
constexpr int64_t TILE_ELEMS = TK / 2 * TN * 2;  // bf16 per B tile (1 KiB)
constexpr int64_t AMX_MIN_D = 16;  // below, the fp32 micro-kernel is faster (one 32-dim chunk would be mostly padding)

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline uint16_t to_bf16(float f) {  // round to nearest even (NaN stays NaN)
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// ||x - c||^2 in fp32, 16 lanes over d then a fixed-order reduction: the distance every comparison uses.
inline float exact_dist(const float* x, const float* c, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(x + d), _mm512_loadu_ps(c + d));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  if (d < D) {
    const __mmask16 m = static_cast<__mmask16>((1u << (D - d)) - 1u);
    const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + d), _mm512_maskz_loadu_ps(m, c + d));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// The codebook in B-tile order: [Q steps][T chunks][2 tiles][16 pairs][16 codes][2] bf16 (zero padding),
// and hsq[k] = ||c_k||^2 / 2 in fp32 (+inf for padded codes). cf: the fp32 codebook (K, D) contiguous.
inline void pack_tiles(const float* cf, int64_t K, int64_t D, int64_t T, uint16_t* tiles, float* hsq) {
  const int64_t Q = (K + BN - 1) / BN;
  at::parallel_for(0, Q, 8, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < 2; ++j) {
          uint16_t* tile = tiles + ((q * T + t) * 2 + j) * TILE_ELEMS;
          for (int64_t n = 0; n < TN; ++n) {
            const int64_t k = q * BN + j * TN + n;
            for (int64_t kp = 0; kp < TK / 2; ++kp)
              for (int64_t i = 0; i < 2; ++i) {
                const int64_t d = t * TK + 2 * kp + i;
                tile[(kp * TN + n) * 2 + i] = (k < K && d < D) ? to_bf16(cf[k * D + d]) : 0;
              }
          }
        }
      for (int64_t k = q * BN; k < (q + 1) * BN; ++k) {
        if (k >= K) {
          hsq[k] = std::numeric_limits<float>::infinity();
          continue;
        }
        float sq = 0.0f;
        for (int64_t d = 0; d < D; ++d) sq += cf[k * D + d] * cf[k * D + d];
        hsq[k] = 0.5f * sq;
      }
    }
  });
}

// Folds one 16-code slice of the scores of BM rows (C in cbuf, row stride BN) into 16 of the lanes
// (best, best2, bidx: row stride BN).
inline void fold(const float* cbuf, const float* hsq, int32_t code0, float* best, float* best2, int32_t* bidx) {
  const __m512 h = _mm512_loadu_ps(hsq);
  const __m512i code = _mm512_add_epi32(_mm512_set1_epi32(code0),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
#pragma GCC unroll 4
  for (int64_t r = 0; r < BM; ++r) {
    const __m512 s = _mm512_sub_ps(h, _mm512_loadu_ps(cbuf + r * BN));
    const __m512 b = _mm512_loadu_ps(best + r * BN);
    const __mmask16 lt = _mm512_cmp_ps_mask(s, b, _CMP_LT_OQ);
    _mm512_storeu_ps(best2 + r * BN, _mm512_min_ps(_mm512_loadu_ps(best2 + r * BN), _mm512_max_ps(s, b)));
    _mm512_mask_storeu_ps(best + r * BN, lt, s);
    _mm512_mask_storeu_epi32(bidx + r * BN, lt, code);
  }
}

// The chosen code of one row from its lane minima (see the top of the file); writes idx and dist.
inline void rerank(const float* xr, const float* cf, int64_t K, int64_t D, float cm, const float* best,
                   const float* best2, const int32_t* bidx, int64_t* idx, float* dist) {
  float m = std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < BN; ++j) m = std::min(m, best[j]);
  float xn2 = 0.0f;
  for (int64_t d = 0; d < D; ++d) xn2 += xr[d] * xr[d];
  const float xn = std::sqrt(xn2), u = 1.0f / 256.0f, g = static_cast<float>(D + 4) / 16777216.0f;
  const float E = 1.25f * ((2 * u + u * u) * xn * cm + g * (0.5f * cm * cm + 1.01f * xn * cm) +
                           g * 0.5f * (xn + cm) * (xn + cm)) +
                  static_cast<float>(D) * 1e-36f;
  const float thr = m + 2 * E;
  const bool everything = !(thr < std::numeric_limits<float>::infinity());  // inf / NaN inputs
  float bd = std::numeric_limits<float>::infinity();
  int64_t bk = -1;
  auto consider = [&](int64_t k) {
    const float dk = exact_dist(xr, cf + k * D, D);
    if (bk < 0 || dk < bd || (dk == bd && k < bk)) {
      bd = dk;
      bk = k;
    }
  };
  for (int64_t j = 0; j < BN; ++j) {
    if (everything || (best[j] <= thr && best2[j] <= thr)) {  // the lane may hide more candidates
      for (int64_t k = j; k < K; k += BN) consider(k);
    } else if (best[j] <= thr) {
      consider(bidx[j]);
    }
  }
  *idx = bk;
  *dist = bd;
}

template <typename scalar_t>
void search_rows(const at::Tensor& x, const float* cf, const uint16_t* tiles, const float* hsq, int64_t K, float cm,
                 int64_t* idx, float* dist) {
  const int64_t N = x.size(0), D = x.size(1), T = (D + TK - 1) / TK, Dp = T * TK, Q = (K + BN - 1) / BN;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  const int64_t blocks = (N + BM - 1) / BM, threads = at::get_num_threads();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, blocks), 1, [&](int64_t, int64_t) {
    TileConfig cfg;
    for (int i = 0; i < 8; ++i) {
      cfg.rows[i] = TM;  // C, A: 16 rows; B: 16 dim pairs
      cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    at::Tensor xf_t = at::zeros({BM, D}, f32), cbuf_t = at::empty({BM, BN}, f32);
    at::Tensor best_t = at::empty({BM, BN}, f32), best2_t = at::empty({BM, BN}, f32);
    at::Tensor bidx_t = at::empty({BM, BN}, f32.dtype(at::kInt)), xb_t = at::zeros({BM, Dp}, f32.dtype(at::kShort));
    float* xf = xf_t.data_ptr<float>();
    float* cbuf = cbuf_t.data_ptr<float>();
    float* best = best_t.data_ptr<float>();
    float* best2 = best2_t.data_ptr<float>();
    int32_t* bidx = bidx_t.data_ptr<int32_t>();
    uint16_t* xb = reinterpret_cast<uint16_t*>(xb_t.data_ptr<int16_t>());
    for (int64_t b = next++; b < blocks; b = next++) {
      const int64_t r0 = b * BM, nr = std::min(BM, N - r0);
      for (int64_t r = 0; r < nr; ++r)  // rows past nr keep old values: computed, never read
        for (int64_t d = 0; d < D; ++d) {
          xf[r * D + d] = static_cast<float>(xp[(r0 + r) * sx0 + d * sx1]);
          xb[r * Dp + d] = to_bf16(xf[r * D + d]);
        }
      std::fill(best, best + BM * BN, std::numeric_limits<float>::infinity());
      std::fill(best2, best2 + BM * BN, std::numeric_limits<float>::infinity());
      std::fill(bidx, bidx + BM * BN, 0);
      for (int64_t q = 0; q < Q; ++q) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const uint16_t* bq = tiles + q * T * 2 * TILE_ELEMS;
        for (int64_t t = 0; t < T; ++t) {
          _tile_loadd(4, xb + t * TK, Dp * 2);
          _tile_loadd(5, xb + TM * Dp + t * TK, Dp * 2);
          _tile_loadd(6, bq + (t * 2) * TILE_ELEMS, 64);
          _tile_loadd(7, bq + (t * 2 + 1) * TILE_ELEMS, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, cbuf, BN * 4);
        _tile_stored(1, cbuf + TN, BN * 4);
        _tile_stored(2, cbuf + TM * BN, BN * 4);
        _tile_stored(3, cbuf + TM * BN + TN, BN * 4);
        const int32_t code0 = static_cast<int32_t>(q * BN);
        fold(cbuf, hsq + q * BN, code0, best, best2, bidx);
        fold(cbuf + TN, hsq + q * BN + TN, code0 + TN, best + TN, best2 + TN, bidx + TN);
      }
      for (int64_t r = 0; r < nr; ++r)
        rerank(xf + r * D, cf, K, D, cm, best + r * BN, best2 + r * BN, bidx + r * BN, idx + r0 + r, dist + r0 + r);
    }
    _tile_release();
  });
}

// (idx, dist) of every row of x through the tile unit (D >= AMX_MIN_D).
inline void search(const at::Tensor& x, const at::Tensor& codebook, int64_t* idx, float* dist) {
  const int64_t K = codebook.size(0), D = codebook.size(1), T = (D + TK - 1) / TK, Q = (K + BN - 1) / BN;
  const at::Tensor cf_t = codebook.to(at::kFloat).contiguous();
  const float* cf = cf_t.data_ptr<float>();
  const auto opts = x.options();
  at::Tensor tiles_t = at::empty({Q * T * 2 * TILE_ELEMS}, opts.dtype(at::kShort));
  at::Tensor hsq_t = at::empty({Q * BN}, opts.dtype(at::kFloat));
  uint16_t* tiles = reinterpret_cast<uint16_t*>(tiles_t.data_ptr<int16_t>());
  float* hsq = hsq_t.data_ptr<float>();
  pack_tiles(cf, K, D, T, tiles, hsq);
  float hmax = 0.0f;
  for (int64_t k = 0; k < K; ++k) hmax = std::max(hmax, hsq[k]);
  const float cm = std::sqrt(2.0f * hmax) * (1.0f + 1e-6f);
  switch (x.scalar_type()) {
    case at::kFloat: search_rows<float>(x, cf, tiles, hsq, K, cm, idx, dist); break;
    case at::kBFloat16: search_rows<c10::BFloat16>(x, cf, tiles, hsq, K, cm, idx, dist); break;
    default: search_rows<c10::Half>(x, cf, tiles, hsq, K, cm, idx, dist); break;
  }
}
