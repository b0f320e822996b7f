"""nn.VectorQuantizer: layouts, embed, gradients, EMA with Laplace smoothing, dead-code restarts,
k-means init, usage statistics (also under a one-process torch.distributed group), validation."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fastdae import _ext
from fastdae.kernels.vq import vector_quantize
from fastdae.nn import VectorQuantizer

HAS_CPP = _ext.available("vq")

CENTERS = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0], [-4.0, -4.0, -4.0]])


def clustered_tokens(batch: int = 8, n: int = 32, noise: float = 0.1) -> torch.Tensor:
    """(batch, n, 3) tokens around the four CENTERS, every center represented."""
    which = torch.arange(batch * n) % len(CENTERS)
    return (CENTERS[which] + noise * torch.randn(batch * n, 3)).view(batch, n, 3)


def test_layouts_and_embed():
    vq = VectorQuantizer(16, 6, impl="ref").eval()
    maps = torch.randn(2, 6, 5, 7)
    out = vq(maps)
    assert out.z_q.shape == maps.shape and out.indices.shape == (2, 5, 7)
    expected = vector_quantize(maps.permute(0, 2, 3, 1), vq.codebook, impl="ref")
    assert torch.equal(out.indices, expected.indices)
    torch.testing.assert_close(out.z_q, expected.z_q.permute(0, 3, 1, 2))
    torch.testing.assert_close(vq.embed(out.indices), out.z_q)
    tokens = torch.randn(3, 11, 6)
    out = vq(tokens)
    assert out.z_q.shape == tokens.shape and out.indices.shape == (3, 11)
    torch.testing.assert_close(vq.embed(out.indices), out.z_q)
    assert vq.codebook.shape == (16, 6)


def test_gradients_reach_encoder_and_codebook():
    vq = VectorQuantizer(8, 3, beta=0.25, dead_code_threshold=0.0)
    z = clustered_tokens().requires_grad_()
    out = vq(z)
    (out.z_q.sum() + out.loss).backward()
    assert z.grad is not None and vq.codebook.grad is not None
    used = torch.zeros(8, dtype=torch.bool)
    used[out.indices.unique()] = True
    assert vq.codebook.grad[used].abs().sum() > 0 and not vq.codebook.grad[~used].any()


def test_bfloat16_input_keeps_fp32_codebook():
    vq = VectorQuantizer(8, 3, dead_code_threshold=0.0)
    z = clustered_tokens().bfloat16().requires_grad_()
    out = vq(z)
    assert out.z_q.dtype == torch.bfloat16 and vq.codebook.dtype == torch.float32
    out.loss.backward()
    assert vq.codebook.grad.dtype == torch.float32


def test_ema_update_matches_formula_with_laplace_smoothing():
    K, decay, eps = 4, 0.9, 1e-5
    vq = VectorQuantizer(K, 3, ema=True, decay=decay, eps=eps, dead_code_threshold=0.0, impl="ref")
    vq.codebook.copy_(CENTERS * 0.5)
    vq.ema_sum.copy_(vq.codebook)
    z = clustered_tokens(1, 9)
    z[0, 4:8] = CENTERS[0]  # uneven counts: code 0 gets 3 + 4
    out = vq(z)
    idx, flat = out.indices.view(-1), z.view(-1, 3)
    counts = torch.bincount(idx, minlength=K).float()
    sums = torch.stack([flat[idx == k].sum(0) for k in range(K)])
    n_ema = decay * torch.ones(K) + (1 - decay) * counts
    s_ema = decay * CENTERS * 0.5 + (1 - decay) * sums
    smoothed = (n_ema + eps) / (n_ema.sum() + K * eps) * n_ema.sum()
    torch.testing.assert_close(vq.ema_count, n_ema)
    torch.testing.assert_close(vq.codebook, s_ema / smoothed[:, None])


def test_ema_converges_to_cluster_means_and_eval_freezes():
    vq = VectorQuantizer(4, 3, ema=True, decay=0.5, dead_code_threshold=0.0, impl="ref")
    vq.codebook.copy_(CENTERS * 0.5)
    vq.ema_sum.copy_(vq.codebook)
    for _ in range(30):
        vq(clustered_tokens())
    torch.testing.assert_close(vq.codebook, CENTERS, atol=0.05, rtol=0)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    vq(clustered_tokens() + 1.0)
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in eval mode"


@pytest.mark.parametrize("ema", [False, True], ids=["param", "ema"])
def test_dead_code_is_revived_and_usage_rises(ema):
    """Codes far from the data are never chosen; after a window they restart on batch vectors."""
    K, window = 8, 3
    vq = VectorQuantizer(K, 3, ema=ema, decay=0.8, dead_code_threshold=0.5, usage_window=window, impl="ref")
    with torch.no_grad():
        vq.codebook.copy_(torch.cat([CENTERS[:1], torch.full((K - 1, 3), 100.0)]))  # only code 0 is near
        if ema:
            vq.ema_sum.copy_(vq.codebook)
    for _ in range(window - 1):
        vq(clustered_tokens())
    stats = vq.usage_stats()
    assert stats["dead_codes"] == K - 1 and stats["restarts"] == 0
    assert stats["perplexity"] == pytest.approx(1.0)
    for _ in range(6 * window):
        vq(clustered_tokens())
    after = vq.usage_stats()
    assert after["restarts"] >= K - 1
    assert (vq.codebook - 100.0).abs().min() > 50, "every far code moved onto the data"
    assert after["used_fraction"] > stats["used_fraction"] and after["used_fraction"] >= 4 / K
    assert after["perplexity"] > 3.0  # all four clusters are now served


def test_restarted_code_resets_ema_state():
    vq = VectorQuantizer(2, 3, ema=True, decay=0.9, dead_code_threshold=0.5, usage_window=1, impl="ref")
    vq.codebook.copy_(torch.stack([CENTERS[0], torch.full((3,), 100.0)]))
    vq.ema_sum.copy_(vq.codebook)
    vq.ema_count.copy_(torch.tensor([1.0, 50.0]))
    vq(clustered_tokens(1, 4)[:, :1] * 0 + CENTERS[0])  # only code 0 is used; code 1 is dead
    assert vq.ema_count[1] == 1.0 and vq.usage[1] == 0.0
    torch.testing.assert_close(vq.ema_sum[1], vq.codebook[1])
    torch.testing.assert_close(vq.codebook[1], CENTERS[0])  # the only batch vector


def test_kmeans_init_on_first_training_batch():
    vq = VectorQuantizer(4, 3, kmeans_init=True, dead_code_threshold=0.0, impl="ref")
    init = vq.codebook.detach().clone()
    vq.eval()
    vq(clustered_tokens())
    assert torch.equal(vq.codebook, init), "no k-means in eval mode"
    vq.train()
    vq(clustered_tokens(noise=0.05))
    gaps = torch.cdist(CENTERS, vq.codebook.detach()).min(dim=1).values
    assert (gaps < 0.5).all(), f"a center has no code near it: {gaps}"
    state = vq.state_dict()
    fresh = VectorQuantizer(4, 3, kmeans_init=True, impl="ref")
    fresh.load_state_dict(state)
    fresh(clustered_tokens() * 3)  # resumed: no second k-means
    assert fresh.initted and (torch.cdist(CENTERS, fresh.codebook.detach()).min(dim=1).values < 0.5).all()


def test_usage_stats_all_reduced_in_a_process_group(tmp_path):
    """One-process gloo group: the all_reduce/broadcast paths run and stats stay consistent."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        vq = VectorQuantizer(4, 3, ema=True, kmeans_init=True, dead_code_threshold=0.1, usage_window=2, impl="ref")
        for _ in range(4):
            vq(clustered_tokens())
        stats = vq.usage_stats()
    finally:
        dist.destroy_process_group()
    assert set(stats) == {"perplexity", "used_fraction", "dead_codes", "restarts"}
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["used_fraction"] == 1.0 and stats["dead_codes"] == 0.0
    assert stats["perplexity"] == pytest.approx(4.0, rel=1e-3)  # the four clusters are equally used


@pytest.mark.parametrize(
    "impl", ["triton", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="C++ op not built"))]
)
def test_module_kernel_impls_match_reference(impl):
    z = clustered_tokens()
    ref = VectorQuantizer(8, 3, ema=True, dead_code_threshold=0.0, impl="ref")
    other = VectorQuantizer(8, 3, ema=True, dead_code_threshold=0.0, impl=impl)
    other.load_state_dict(ref.state_dict())
    a, b = ref(z), other(z)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(ref.codebook, other.codebook)


@pytest.mark.parametrize(
    "z, match",
    [(torch.randn(2, 3), r"\(B, D=3, H, W\)"), (torch.randn(2, 4, 5), "D=3"), (torch.randn(2, 5, 4, 4), "D=3")],
)
def test_validation(z, match):
    vq = VectorQuantizer(4, 3)
    with pytest.raises(ValueError, match=match):
        vq(z)
    with pytest.raises(TypeError, match="integer"):
        vq.embed(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(4, 3, decay=1.0)
