// The LPIPS head's tile loops (csrc/lpips.cpp describes them), compiled once per instruction set:
// (csrc/isa_copies.h, no include guard), after the headers, the constants and `Layer` it uses (none
// are included here).

// src: one image's map; dst[c * TP + p] for positions p0 .. p0 + np, lanes np .. TP zero-filled.
template <typename scalar_t>
void gather(const scalar_t* src, const Layer& L, int64_t p0, int64_t np, float* dst) {
  if (np < TP) std::fill(dst, dst + L.C * TP, 0.0f);
  if (L.nhwc) {  // a blocked transpose: CB channels x TP positions stay within L1
    for (int64_t c0 = 0; c0 < L.C; c0 += CB) {
      const int64_t c1 = std::min(L.C, c0 + CB);
      for (int64_t p = 0; p < np; ++p) {
        const scalar_t* v = src + (p0 + p) * L.C;
        for (int64_t c = c0; c < c1; ++c) dst[c * TP + p] = static_cast<float>(v[c]);
      }
    }
  } else {
    for (int64_t c = 0; c < L.C; ++c) {
      const scalar_t* row = src + c * L.HW + p0;
      for (int64_t p = 0; p < np; ++p) dst[c * TP + p] = static_cast<float>(row[p]);
    }
  }
}

template <typename scalar_t>
void scatter(const float* src, const Layer& L, int64_t p0, int64_t np, scalar_t* dst) {
  if (L.nhwc) {
    for (int64_t c0 = 0; c0 < L.C; c0 += CB) {
      const int64_t c1 = std::min(L.C, c0 + CB);
      for (int64_t p = 0; p < np; ++p) {
        scalar_t* v = dst + (p0 + p) * L.C;
        for (int64_t c = c0; c < c1; ++c) v[c] = static_cast<scalar_t>(src[c * TP + p]);
      }
    }
  } else {
    for (int64_t c = 0; c < L.C; ++c) {
      scalar_t* row = dst + c * L.HW + p0;
      for (int64_t p = 0; p < np; ++p) row[p] = static_cast<scalar_t>(src[c * TP + p]);
    }
  }
}

// Per-lane norms of the two gathered tiles: n = ||x[:, p]||, r = 1 / (n + eps).
void tile_norms(const float* x0, const float* x1, int64_t C, float* n0, float* n1, float* r0, float* r1) {
  float s0[TP] = {}, s1[TP] = {};
  for (int64_t c = 0; c < C; ++c) {
    const float* a = x0 + c * TP;
    const float* b = x1 + c * TP;
#pragma omp simd
    for (int64_t p = 0; p < TP; ++p) {
      s0[p] += a[p] * a[p];
      s1[p] += b[p] * b[p];
    }
  }
  for (int64_t p = 0; p < TP; ++p) {
    n0[p] = std::sqrt(s0[p]);
    n1[p] = std::sqrt(s1[p]);
    r0[p] = 1.0f / (n0[p] + EPS);
    r1[p] = 1.0f / (n1[p] + EPS);
  }
}

int64_t grain_for(const Layer& L) { return std::max<int64_t>(1, TILE_GRAIN_ELEMS / (L.C * TP)); }

// Per-lane norms of a tile pair (see tile_norms).
struct TileNorms {
  float n0[TP], n1[TP], r0[TP], r1[TP];
};

// The one tile loop of both passes: for each (image b, tile of TP positions from p0) in parallel,
// gathers the two feature tiles into per-thread (C, TP) buffers x0, x1 (zero-filled past np),
// computes their norms and calls body(t, b, p0, np, x0, x1, norms); t = b * L.tiles + tile.
template <typename scalar_t, typename Body>
void for_each_tile(const Layer& L, Body body) {
  const scalar_t* f0 = L.f0.data_ptr<scalar_t>();
  const scalar_t* f1 = L.f1.data_ptr<scalar_t>();
  const int64_t image = L.C * L.HW;
  at::parallel_for(0, L.B * L.tiles, grain_for(L), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * L.C * TP);
    float* x0 = buf.data();
    float* x1 = x0 + L.C * TP;
    TileNorms nm;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / L.tiles, p0 = (t % L.tiles) * TP, np = std::min(TP, L.HW - p0);
      gather(f0 + b * image, L, p0, np, x0);
      gather(f1 + b * image, L, p0, np, x1);
      tile_norms(x0, x1, L.C, nm.n0, nm.n1, nm.r0, nm.r1);
      body(t, b, p0, np, x0, x1, nm);
    }
  });
}

// Adds this layer's distance to out (B,). Tile sums land in `partial` and are added in a fixed order,
// so the result does not depend on the thread count.
template <typename scalar_t>
void layer_fwd(const Layer& L, float* out) {
  const float* w = L.w.data_ptr<float>();
  std::vector<double> partial(L.B * L.tiles);
  for_each_tile<scalar_t>(L, [&](int64_t t, int64_t, int64_t, int64_t, float* x0, float* x1, const TileNorms& nm) {
    float acc[TP] = {};  // sum_c w_c d_c^2 per lane; zero-filled lanes give d = 0
    for (int64_t c = 0; c < L.C; ++c) {
      const float wc = w[c];
      const float* a = x0 + c * TP;
      const float* bb = x1 + c * TP;
#pragma omp simd
      for (int64_t p = 0; p < TP; ++p) {
        const float d = a[p] * nm.r0[p] - bb[p] * nm.r1[p];
        acc[p] += wc * d * d;
      }
    }
    double s = 0.0;
    for (int64_t p = 0; p < TP; ++p) s += acc[p];
    partial[t] = s;
  });
  for (int64_t b = 0; b < L.B; ++b) {
    double s = 0.0;
    for (int64_t i = 0; i < L.tiles; ++i) s += partial[b * L.tiles + i];
    out[b] += static_cast<float>(s / static_cast<double>(L.HW));
  }
}

// Writes dL/df0 into g0 and dL/df1 into g1 (either may be undefined when not needed).
template <typename scalar_t>
void layer_bwd(const Layer& L, const float* grad, at::Tensor& g0, at::Tensor& g1) {
  const float* w = L.w.data_ptr<float>();
  scalar_t* g0p = g0.defined() ? g0.data_ptr<scalar_t>() : nullptr;
  scalar_t* g1p = g1.defined() ? g1.data_ptr<scalar_t>() : nullptr;
  const int64_t image = L.C * L.HW;
  for_each_tile<scalar_t>(L, [&](int64_t, int64_t b, int64_t p0, int64_t np, float* x0, float* x1,
                                 const TileNorms& nm) {
    const float* r0 = nm.r0;
    const float* r1 = nm.r1;
    const float coef = 2.0f * grad[b] / static_cast<float>(L.HW);
    float s0[TP] = {}, s1[TP] = {};  // a . f0, a . f1 per lane
    for (int64_t c = 0; c < L.C; ++c) {
      const float wc = coef * w[c];
      const float* a = x0 + c * TP;
      const float* bb = x1 + c * TP;
#pragma omp simd
      for (int64_t p = 0; p < TP; ++p) {
        const float ac = wc * (a[p] * r0[p] - bb[p] * r1[p]);
        s0[p] += ac * a[p];
        s1[p] += ac * bb[p];
      }
    }
    float k0[TP], k1[TP];  // dL/df0 = a r0 - k0 f0, dL/df1 = -a r1 - k1 f1
    for (int64_t p = 0; p < TP; ++p) {
      k0[p] = nm.n0[p] > 0.0f ? r0[p] * r0[p] / nm.n0[p] * s0[p] : 0.0f;
      k1[p] = nm.n1[p] > 0.0f ? -r1[p] * r1[p] / nm.n1[p] * s1[p] : 0.0f;
    }
    for (int64_t c = 0; c < L.C; ++c) {  // in place: x0 <- dL/df0, x1 <- dL/df1
      const float wc = coef * w[c];
      float* a = x0 + c * TP;
      float* bb = x1 + c * TP;
#pragma omp simd
      for (int64_t p = 0; p < TP; ++p) {
        const float ac = wc * (a[p] * r0[p] - bb[p] * r1[p]);
        const float ga = ac * r0[p] - k0[p] * a[p];
        const float gb = -ac * r1[p] - k1[p] * bb[p];
        a[p] = ga;
        bb[p] = gb;
      }
    }
    if (g0p) scatter(x0, L, p0, np, g0p + b * image);
    if (g1p) scatter(x1, L, p0, np, g1p + b * image);
  });
}
