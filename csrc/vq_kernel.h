// The fp32 nearest-code micro-kernel (csrc/vq.cpp describes it), compiled once per instruction set
// (csrc/isa_copies.h, no include guard): FASTDAE_AVX512 is 1 in the AVX-512 copy (16 lanes in zmm,
// 6 rows, masked-store minimum updates), 0 in the others (8 lanes: ymm or two xmm, 3 rows).
// <immintrin.h>, ATen and the standard headers it uses come first (none are included here).

constexpr int64_t W = FASTDAE_AVX512 ? 16 : 8;  // lanes per vector
// rows per micro-kernel: MR x NV accumulators + NV codes + a broadcast fit the registers
constexpr int64_t MR = FASTDAE_AVX512 ? 6 : 3;
constexpr int64_t NV = 2;       // vectors of codes per micro-kernel
constexpr int64_t NR = NV * W;  // codes per panel
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

constexpr int64_t RB_MAX = 96;            // rows per block at most (the unit of parallel work)
constexpr int64_t BLOCKS_PER_THREAD = 8;  // at least, when N allows: threads finish within ~1/8 of their work
constexpr int64_t TILE_FLOATS = 1 << 13;  // codes per tile x D: a 32 KiB tile (at least one panel) stays in L1

inline vf load_vf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Lanes where s < best[] (strict: a lane keeps its first minimum) write s to best[] and code to
// best_idx[]. The running minima live in L1, not registers, to leave the registers to the
// accumulators (GCC spills the codes otherwise): with AVX-512 a compare and two masked stores.
inline void update_min(vf s, float* best, int32_t* best_idx, vi code) {
#if FASTDAE_AVX512
  const __mmask16 lt = _mm512_cmp_ps_mask(s, _mm512_loadu_ps(best), _CMP_LT_OQ);
  _mm512_mask_storeu_ps(best, lt, s);
  _mm512_mask_storeu_epi32(best_idx, lt, reinterpret_cast<__m512i>(code));
#else
  vf old;
  vi old_idx;
  std::memcpy(&old, best, sizeof old);
  std::memcpy(&old_idx, best_idx, sizeof old_idx);
  const vi lt = s < old;  // all-ones lanes where s wins; bit selects (no vector ?:, which older Clang lacks)
  old = (vf)(((vi)s & lt) | ((vi)old & ~lt));
  old_idx = (code & lt) | (old_idx & ~lt);
  std::memcpy(best, &old, sizeof old);
  std::memcpy(best_idx, &old_idx, sizeof old_idx);
#endif
}

// MR rows of x (fp32, row-major, stride D) against panels [p0, p1): per-lane running minima of the
// score hsq - x.c in (best, best_idx) (MR x NR each). Panels arrive in increasing code order, so
// with the strict '<' each lane holds its lowest-index minimum.
inline void sweep(const float* x, int64_t D, const float* panels, const float* hsq, int64_t p0, int64_t p1,
                  float* best, int32_t* best_idx) {
  vi lane;
  for (int64_t j = 0; j < W; ++j) lane[j] = static_cast<int32_t>(j);
  for (int64_t p = p0; p < p1; ++p) {
    const float* cp = panels + p * D * NR;
    vf acc[MR][NV];
#pragma GCC unroll 4
    for (int64_t v = 0; v < NV; ++v) {
      const vf h = load_vf(hsq + p * NR + v * W);
#pragma GCC unroll 8
      for (int64_t r = 0; r < MR; ++r) acc[r][v] = h;
    }
    for (int64_t d = 0; d < D; ++d) {
      vf c[NV];
#pragma GCC unroll 4
      for (int64_t v = 0; v < NV; ++v) c[v] = load_vf(cp + d * NR + v * W);
#pragma GCC unroll 8
      for (int64_t r = 0; r < MR; ++r) {
        const float xs = x[r * D + d];
#pragma GCC unroll 4
        for (int64_t v = 0; v < NV; ++v) acc[r][v] -= xs * c[v];  // one FMA with a broadcast operand
      }
    }
#pragma GCC unroll 4
    for (int64_t v = 0; v < NV; ++v) {
      const vi code = lane + static_cast<int32_t>(p * NR + v * W);
#pragma GCC unroll 8
      for (int64_t r = 0; r < MR; ++r) update_min(acc[r][v], best + r * NR + v * W, best_idx + r * NR + v * W, code);
    }
  }
}

// codebook (K, D) of any strides and accepted dtype -> panels ([P][D][NR], zero-padded codes) and
// hsq[k] = ||c_k||^2 / 2 (+inf for padding), P = ceil(K / NR).
template <typename scalar_t>
void pack_codebook(const at::Tensor& codebook, float* panels, float* hsq) {
  const int64_t K = codebook.size(0), D = codebook.size(1), P = (K + NR - 1) / NR;
  const scalar_t* cp = codebook.data_ptr<scalar_t>();
  const int64_t s0 = codebook.stride(0), s1 = codebook.stride(1);
  at::parallel_for(0, P, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t p = q0; p < q1; ++p) {
      float* panel = panels + p * D * NR;
      for (int64_t j = 0; j < NR; ++j) {
        const int64_t k = p * NR + j;
        float sq = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
          const float c = k < K ? static_cast<float>(cp[k * s0 + d * s1]) : 0.0f;
          panel[d * NR + j] = c;
          sq += c * c;
        }
        hsq[k] = k < K ? 0.5f * sq : std::numeric_limits<float>::infinity();
      }
    }
  });
}

template <typename scalar_t>
void nearest(const at::Tensor& x, const float* panels, const float* hsq, int64_t K, int64_t* idx, float* dist) {
  const int64_t N = x.size(0), D = x.size(1), P = (K + NR - 1) / NR;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
  // Row blocks of whole micro-kernel groups: at most RB_MAX rows, at least BLOCKS_PER_THREAD blocks
  // per thread. Threads take blocks from a shared counter, so a thread that the OS deschedules (the
  // cores are shared) does not hold the others at the end.
  const int64_t groups = (N + MR - 1) / MR, threads = at::get_num_threads();
  const int64_t gpb = std::clamp<int64_t>((groups + BLOCKS_PER_THREAD * threads - 1) / (BLOCKS_PER_THREAD * threads),
                                          1, RB_MAX / MR);  // groups per block
  const int64_t RB = gpb * MR, blocks = (groups + gpb - 1) / gpb;
  const int64_t tile = std::max<int64_t>(1, TILE_FLOATS / (NR * std::max<int64_t>(D, 1)));  // panels per tile
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, blocks), 1, [&](int64_t, int64_t) {
    // per-thread buffers in torch-allocated memory, so memory profilers see them too
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor xbuf_t = at::zeros({RB, D}, opts), bv_t = at::empty({RB, NR}, opts);
    at::Tensor bi_t = at::empty({RB, NR}, opts.dtype(at::kInt));
    float* xbuf = xbuf_t.data_ptr<float>();
    float* bv = bv_t.data_ptr<float>();
    int32_t* bi = bi_t.data_ptr<int32_t>();
    for (int64_t b = next++; b < blocks; b = next++) {
      const int64_t r0 = b * RB, nr = std::min(RB, N - r0);
      for (int64_t r = 0; r < nr; ++r)  // rows past nr (last block) hold old values: computed, never read
        for (int64_t d = 0; d < D; ++d) xbuf[r * D + d] = static_cast<float>(xp[(r0 + r) * sx0 + d * sx1]);
      std::fill(bv, bv + RB * NR, std::numeric_limits<float>::infinity());
      std::fill(bi, bi + RB * NR, 0);
      const int64_t ng = (nr + MR - 1) / MR;
      for (int64_t q0 = 0; q0 < P; q0 += tile)
        for (int64_t g = 0; g < ng; ++g)
          sweep(xbuf + g * MR * D, D, panels, hsq, q0, std::min(P, q0 + tile), bv + g * MR * NR, bi + g * MR * NR);
      for (int64_t r = 0; r < nr; ++r) {
        // lane merge: the minimum score, the lowest code index among equal scores
        float best = std::numeric_limits<float>::infinity();
        int32_t best_idx = 0;
        for (int64_t j = 0; j < NR; ++j) {
          const float s = bv[r * NR + j];
          const int32_t k = bi[r * NR + j];
          if (s < best || (s == best && k < best_idx)) {
            best = s;
            best_idx = k;
          }
        }
        // sqdist from the difference itself: exact to fp32 rounding
        const float* xr = xbuf + r * D;
        const float* cp = panels + (best_idx / NR) * D * NR + best_idx % NR;
        float acc = 0.0f;
        for (int64_t d = 0; d < D; ++d) acc += (xr[d] - cp[d * NR]) * (xr[d] - cp[d * NR]);
        idx[r0 + r] = best_idx;
        dist[r0 + r] = acc;
      }
    }
  });
}

// (idx, dist) of every row of x: pack the codebook (P NR x D floats, ||c||^2 / 2), then search.
inline void search(const at::Tensor& x, const at::Tensor& codebook, int64_t* idx, float* dist) {
  const int64_t K = codebook.size(0), D = codebook.size(1), P = (K + NR - 1) / NR;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor panels = at::empty({P, D, NR}, f32), hsq = at::empty({P * NR}, f32);
  float* pp = panels.data_ptr<float>();
  float* hp = hsq.data_ptr<float>();
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    pack_codebook<scalar_t>(codebook, pp, hp);
    nearest<scalar_t>(x, pp, hp, K, idx, dist);
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    default: run(c10::Half{}); break;
  }
}
