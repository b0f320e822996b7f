// Nearest-code search on CPU: for x (N, D) and a codebook c (K, D),
//   idx[n]    = argmin_k ||x_n - c_k||^2 = argmin_k (||c_k||^2 / 2 - x_n . c_k)   (lowest k wins ties)
//   sqdist[n] = ||x_n - c_idx[n]||^2, recomputed directly from the difference (no cancellation)
// No score matrix is ever written, not even a tile of it: a register-blocked micro-kernel (a GEMM
// micro-kernel with the argmin as its epilogue) computes the scores of MR rows x NR codes in
// registers and folds them straight into per-lane running minima. A BLAS call per score tile plus a
// pass over it (FAISS's IndexFlatL2, and this file before) writes and re-reads every score, which
// bounds it at small D.
//   - the codebook is packed once per call into panels of NR codes, d-major ([P][D][NR] fp32,
//     P = ceil(K / NR)), so the micro-kernel loads NR consecutive codes' d-th components as NV
//     vectors; each accumulator starts at ||c||^2 / 2 (padded codes: +inf, they never win);
//   - x is cut into row blocks (at most RB_MAX rows, converted to fp32) that threads take from a
//     shared counter; a block sweeps the codebook in L1-sized tiles of panels, MR rows at a time.
// Extra memory: the packed codebook (P NR x D floats, in place of an fp32 copy), ||c||^2 / 2 and
// per-thread RB_MAX x (D + 2 NR) words: O(N + K) for a fixed D. All arithmetic is fp32.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "cpu_dispatch.h"
#if FASTDAE_X86
#include <immintrin.h>
#endif

// The micro-kernel once per instruction set (csrc/vq_kernel.h), picked per call by cpu_isa():
//   generic: the baseline (SSE2 on x86-64), 8 lanes as two xmm, 3 rows;
//   avx2:    8 lanes in ymm, 3 rows (16 registers);
//   avx512:  16 lanes in zmm, 6 rows (32 registers), masked-store minimum updates;
//   amx:     for D >= 16, a bf16 coarse pass on the tile unit and an exact fp32 re-rank (csrc/vq_amx.h);
//            below D = 16 (and at avx512bf16, which has no kernel of its own) the avx512 micro-kernel.
#define FASTDAE_KERNEL "vq_kernel.h"
#include "isa_copies.h"

#if FASTDAE_X86
FASTDAE_TARGET_AMX
namespace {
namespace amx {
#include "vq_amx.h"
}  // namespace amx
}  // namespace
FASTDAE_TARGET_END
#endif

namespace {

using fastdae_cpu::Isa;

// The largest codes-per-panel of any path: K must leave room for one panel of padding in int32.
constexpr int64_t NR_MAX = 32;

void search(const at::Tensor& x, const at::Tensor& codebook, int64_t* idx, float* dist) {
#if FASTDAE_X86
  const Isa isa = fastdae_cpu::cpu_isa();
  if (isa >= Isa::amx && x.size(1) >= amx::AMX_MIN_D) return amx::search(x, codebook, idx, dist);
  if (isa >= Isa::avx512) return avx512::search(x, codebook, idx, dist);
  if (isa >= Isa::avx2) return avx2::search(x, codebook, idx, dist);
#endif
  generic::search(x, codebook, idx, dist);
}

// fastdae::vq_nearest on CPU: (sqdist (N,) float32, idx (N,) int64), the schema's order.
std::tuple<at::Tensor, at::Tensor> vq_nearest(const at::Tensor& x, const at::Tensor& codebook) {
  TORCH_CHECK(x.dim() == 2, "vq_nearest: x must be (N, D), got ", x.sizes());
  TORCH_CHECK(codebook.dim() == 2 && codebook.size(0) > 0 && codebook.size(1) == x.size(1),
              "vq_nearest: codebook must be (K >= 1, D=", x.size(1), "), got ", codebook.sizes());
  TORCH_CHECK(codebook.size(0) <= std::numeric_limits<int32_t>::max() - NR_MAX, "vq_nearest: K must fit in int32");
  TORCH_CHECK(x.scalar_type() == codebook.scalar_type(), "vq_nearest: x and codebook dtypes differ");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
              "vq_nearest: x must be float32, bfloat16 or float16, got ", t);
  const int64_t N = x.size(0);
  at::Tensor idx = at::empty({N}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {dist, idx};
  search(x, codebook, idx.data_ptr<int64_t>(), dist.data_ptr<float>());
  return {dist, idx};
}

// fastdae::vector_quantize's forward on CPU: (z_q = codebook[idx] (N, D), idx (N,), loss ()) with
// loss = (1 + beta) * mean ||z - z_q||^2 (fastdae/kernels/vq.py has the formula and the backward).
std::tuple<at::Tensor, at::Tensor, at::Tensor> vector_quantize(const at::Tensor& z, const at::Tensor& codebook,
                                                               double beta) {
  auto [dist, idx] = vq_nearest(z, codebook);
  at::Tensor z_q = codebook.index_select(0, idx);
  return {z_q, idx, dist.sum() * ((1.0 + beta) / std::max<int64_t>(z.numel(), 1))};
}

}  // namespace

// CPU kernels of ops whose schemas fastdae/kernels/vq.py defines (csrc/README.md).
TORCH_LIBRARY_IMPL(fastdae, CPU, m) {
  m.impl("vq_nearest", &vq_nearest);
  m.impl("vector_quantize", &vector_quantize);
}

// Which kernel this CPU runs (fastdae/_ext.py: cpu_isa): tests and benchmarks read it.
TORCH_LIBRARY(fastdae_cpu, m) {
  m.def("isa() -> str", [] { return std::string(fastdae_cpu::isa_name(fastdae_cpu::cpu_isa())); });
}
