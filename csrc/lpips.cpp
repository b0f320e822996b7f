// LPIPS head on CPU: for each layer l with features f0, f1 (B, C, H, W) and weights w (C,),
//   u = f / (||f||_2 + eps)   (norm over channels, per image and position)
//   out[b] += 1/(H W) * sum_p sum_c w_c (u0 - u1)_c^2
// Backward (a_c = 2 g_b / (H W) * w_c (u0 - u1)_c = dL/du0 = -dL/du1, r = 1 / (n + eps)):
//   dL/df = r a - r^2 / n * (a . f) f        (the second term -> 0 as f -> 0, so f = 0 gives r a)
// Both passes read each feature map from memory once: a tile of TP positions x all C channels is
// gathered (converted to float) into a thread-local channel-major buffer, every reduction and the
// gradient run on that cache-resident buffer, and gradients are scattered back in the input layout.
// Contiguous (NCHW) and channels_last (NHWC) inputs are read in place; other strides are copied.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "cpu_dispatch.h"

namespace {

constexpr int64_t TP = 64;  // positions per tile: 256 B of each NCHW channel row per read; measured best of 16-128
constexpr int64_t CB = 16;     // channels per block of the NHWC <-> tile transpose
constexpr float EPS = 1e-10f;  // added to the norm, as in the lpips package
constexpr int64_t TILE_GRAIN_ELEMS = 1 << 15;  // per parallel chunk, so tiny layers stay serial

// Calls fn(scalar_t{}) for the feature dtypes the op accepts.
template <typename Fn>
void dispatch_feature_dtype(at::ScalarType t, const char* name, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, name, ": features must be float32, bfloat16 or float16, got ", t);
  }
}

// One layer's inputs in a layout the tile loops read in place.
struct Layer {
  at::Tensor f0, f1, w;  // f0, f1 share one layout; w (C,) float32
  int64_t B, C, HW;
  bool nhwc;             // channels_last (channel stride 1) rather than contiguous (spatial stride 1)
  int64_t tiles;         // tiles per image
};

Layer prepare(const at::Tensor& f0, const at::Tensor& f1, const at::Tensor& w) {
  TORCH_CHECK(f0.dim() == 4 && f0.sizes() == f1.sizes(), "lpips_head: feats0/feats1 must be equal (B, C, H, W), got ",
              f0.sizes(), " and ", f1.sizes());
  TORCH_CHECK(f0.scalar_type() == f1.scalar_type(), "lpips_head: feats0/feats1 dtypes differ");
  TORCH_CHECK(w.numel() == f0.size(1), "lpips_head: weights must have C=", f0.size(1), " elements, got ", w.numel());
  // NHWC only when it differs from NCHW (for C == 1 or H W == 1 both layouts are the same memory).
  const bool nhwc = !f0.is_contiguous() && f0.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  Layer L{f0.contiguous(fmt), f1.contiguous(fmt), w.to(at::kFloat).contiguous(), f0.size(0), f0.size(1),
          f0.size(2) * f0.size(3), nhwc, 0};
  L.tiles = (L.HW + TP - 1) / TP;
  return L;
}

}  // namespace

// The tile loops once per instruction set (csrc/lpips_kernel.h: the compiler vectorises them for
// the target), picked per call by cpu_isa(): the portable baseline, AVX2 + FMA, AVX-512.
#define FASTDAE_KERNEL "lpips_kernel.h"
#include "isa_copies.h"

namespace {

using fastdae_cpu::Isa;

template <typename scalar_t>
void layer_fwd(const Layer& L, float* out) {
#if FASTDAE_X86
  const Isa isa = fastdae_cpu::cpu_isa();
  if (isa >= Isa::avx512) return avx512::layer_fwd<scalar_t>(L, out);
  if (isa >= Isa::avx2) return avx2::layer_fwd<scalar_t>(L, out);
#endif
  generic::layer_fwd<scalar_t>(L, out);
}

template <typename scalar_t>
void layer_bwd(const Layer& L, const float* grad, at::Tensor& g0, at::Tensor& g1) {
#if FASTDAE_X86
  const Isa isa = fastdae_cpu::cpu_isa();
  if (isa >= Isa::avx512) return avx512::layer_bwd<scalar_t>(L, grad, g0, g1);
  if (isa >= Isa::avx2) return avx2::layer_bwd<scalar_t>(L, grad, g0, g1);
#endif
  generic::layer_bwd<scalar_t>(L, grad, g0, g1);
}

void check_lists(at::TensorList f0, at::TensorList f1, at::TensorList w) {
  TORCH_CHECK(!f0.empty() && f0.size() == f1.size() && f0.size() == w.size(),
              "lpips_head: feats0, feats1 and weights must be non-empty lists of one length");
}

at::Tensor lpips_head_fwd(at::TensorList feats0, at::TensorList feats1, at::TensorList weights) {
  check_lists(feats0, feats1, weights);
  at::Tensor out = at::zeros({feats0[0].size(0)}, feats0[0].options().dtype(at::kFloat));
  for (size_t l = 0; l < feats0.size(); ++l) {
    TORCH_CHECK(feats0[l].size(0) == out.size(0), "lpips_head: every layer needs the same batch size");
    const Layer L = prepare(feats0[l], feats1[l], weights[l]);
    dispatch_feature_dtype(L.f0.scalar_type(), "lpips_head_fwd", [&](auto tag) {
      layer_fwd<decltype(tag)>(L, out.data_ptr<float>());
    });
  }
  return out;
}

// A gradient buffer in the layout the tile loops write (that of the prepared f0), returned in the
// layout torch.empty_like(f) has, which is what the op's fake implementation promises.
at::Tensor in_layout_of(const at::Tensor& g, const at::Tensor& f) {
  at::Tensor out = at::empty_like(f);
  if (out.strides() == g.strides()) return g;
  return out.copy_(g);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> lpips_head_bwd(
    const at::Tensor& grad, at::TensorList feats0, at::TensorList feats1, at::TensorList weights, bool need0,
    bool need1) {
  check_lists(feats0, feats1, weights);
  const at::Tensor g = grad.to(at::kFloat).contiguous();
  TORCH_CHECK(g.dim() == 1 && g.size(0) == feats0[0].size(0), "lpips_head_bwd: grad must be (B,)");
  std::vector<at::Tensor> grads0, grads1;
  for (size_t l = 0; l < feats0.size(); ++l) {
    const Layer L = prepare(feats0[l], feats1[l], weights[l]);
    at::Tensor g0 = need0 ? at::empty_like(L.f0) : at::Tensor();
    at::Tensor g1 = need1 ? at::empty_like(L.f0) : at::Tensor();
    dispatch_feature_dtype(L.f0.scalar_type(), "lpips_head_bwd", [&](auto tag) {
      layer_bwd<decltype(tag)>(L, g.data_ptr<float>(), g0, g1);
    });
    if (need0) grads0.push_back(in_layout_of(g0, feats0[l]));
    if (need1) grads1.push_back(in_layout_of(g1, feats1[l]));
  }
  return {grads0, grads1};
}

}  // namespace

// CPU kernels of ops whose schemas fastdae/kernels/lpips.py defines (csrc/README.md).
TORCH_LIBRARY_IMPL(fastdae, CPU, m) {
  m.impl("lpips_head", &lpips_head_fwd);
  m.impl("lpips_head_backward", &lpips_head_bwd);
}
