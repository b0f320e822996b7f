"""fastdae.integrations.taming against the real taming-transformers (installed --no-deps in [dev]):
VectorQuantizer2's outputs, loss, gradients and state dict under both loss conventions, remap,
sane_index_shape, get_codebook_entry, and patch_vq inside taming's own VQModel.encode/decode."""

from __future__ import annotations

import ast
import copy
import inspect

import numpy as np
import pytest
import torch
from torch import nn

quantize = pytest.importorskip(
    "taming.modules.vqvae.quantize", reason="pip install --no-deps taming-transformers-rom1504"
)
from taming.modules.diffusionmodules.model import Decoder, Encoder  # noqa: E402

from fastdae.integrations.taming import VectorQuantizer2, patch_vq  # noqa: E402

N_E, E_DIM = 64, 8


def pair(seed: int = 0, **kw) -> tuple[nn.Module, VectorQuantizer2]:
    torch.manual_seed(seed)
    theirs = quantize.VectorQuantizer2(N_E, E_DIM, beta=0.25, **kw)
    ours = VectorQuantizer2(N_E, E_DIM, beta=0.25, **kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def run(model: nn.Module, z: torch.Tensor, upstream: torch.Tensor):
    """forward + backward of sum(upstream * z_q) + loss; returns outputs and the grads of z and codebook."""
    z = z.clone().requires_grad_()
    model.zero_grad()
    z_q, loss, info = model(z)
    ((upstream * z_q).sum() + loss).backward()
    return z_q.detach(), loss.detach(), info, z.grad, model.embedding.weight.grad.clone()


@pytest.mark.parametrize("legacy", [True, False])
def test_forward_loss_and_gradients_match_taming(legacy):
    theirs, ours = pair(legacy=legacy)
    z = torch.randn(2, E_DIM, 6, 5) * 0.05  # the scale of the U(-1/64, 1/64) init: many codes in play
    upstream = torch.randn_like(z)
    zq_t, loss_t, (ppl_t, enc_t, idx_t), dz_t, dc_t = run(theirs, z, upstream)
    zq_o, loss_o, (ppl_o, enc_o, idx_o), dz_o, dc_o = run(ours, z, upstream)
    assert ppl_t is ppl_o is None and enc_t is enc_o is None
    assert idx_o.shape == idx_t.shape == (2 * 6 * 5,) and torch.equal(idx_o, idx_t)
    assert len(idx_t.unique()) > 10
    torch.testing.assert_close(zq_o, zq_t, rtol=0, atol=1e-7)  # taming's z + (z_q - z) rounds
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=0)
    torch.testing.assert_close(dz_o, dz_t, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(dc_o, dc_t, rtol=1e-5, atol=1e-9)


def test_legacy_settings_differ_in_gradients_only():
    """The conventions have equal values; legacy puts beta on the codebook term's gradient."""
    z = torch.randn(2, E_DIM, 4, 4) * 0.05
    upstream = torch.zeros_like(z)
    _, loss_l, _, dz_l, dc_l = run(pair(legacy=True)[1], z, upstream)
    _, loss_n, _, dz_n, dc_n = run(pair(legacy=False)[1], z, upstream)
    torch.testing.assert_close(loss_l, loss_n)
    torch.testing.assert_close(dz_l, dz_n / 0.25)  # commitment: weight 1 (legacy) vs beta
    torch.testing.assert_close(dc_l, dc_n * 0.25)  # codebook: weight beta (legacy) vs 1


def test_state_dict_round_trip_both_ways():
    theirs, ours = pair()
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["embedding.weight"]
    fresh = quantize.VectorQuantizer2(N_E, E_DIM, beta=0.25)
    fresh.load_state_dict(ours.state_dict())  # strict
    assert torch.equal(fresh.embedding.weight, theirs.embedding.weight)
    # the init is taming's: U(-1/n_e, 1/n_e)
    w = VectorQuantizer2(N_E, E_DIM, 0.25).embedding.weight
    assert w.abs().max() <= 1 / N_E and w.std() > 0.5 / N_E / 3**0.5


def test_sane_index_shape_and_get_codebook_entry():
    theirs, ours = pair(sane_index_shape=True)
    z = torch.randn(3, E_DIM, 4, 5) * 0.05
    zq_t, _, (_, _, idx_t) = theirs(z)
    zq_o, _, (_, _, idx_o) = ours(z)
    assert idx_o.shape == (3, 4, 5) and torch.equal(idx_o, idx_t)
    shape = (3, 4, 5, E_DIM)
    back_o = ours.get_codebook_entry(idx_o.reshape(-1), shape)
    assert torch.equal(back_o, theirs.get_codebook_entry(idx_t.reshape(-1), shape))
    torch.testing.assert_close(back_o, zq_o, rtol=0, atol=0)
    assert torch.equal(
        ours.get_codebook_entry(idx_o.reshape(-1), None), theirs.get_codebook_entry(idx_t.reshape(-1), None)
    )


@pytest.mark.parametrize("unknown_index", ["extra", 3, "random"])
def test_remap_matches_taming(tmp_path, unknown_index):
    used = np.array([5, 1, 9, 40, 1, 33, 2, 17], dtype=np.int64)  # a duplicate: the first position wins
    np.save(tmp_path / "used.npy", used)
    theirs, ours = pair(remap=str(tmp_path / "used.npy"), unknown_index=unknown_index)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["used", "embedding.weight"]
    assert (ours.re_embed, ours.unknown_index) == (theirs.re_embed, theirs.unknown_index)
    z = torch.randn(2, E_DIM, 5, 5) * 0.05
    with torch.no_grad():  # some tokens land on used codes, the rest are unknown
        z[:, :, 0, :] = theirs.embedding.weight[torch.tensor(used[:5])].T
    _, _, (_, _, idx_t) = theirs(z)
    _, _, (_, _, idx_o) = ours(z)
    assert idx_o.shape == idx_t.shape == (50, 1)
    full = ours.embedding.weight  # codebook indices of the tokens tell knowns from unknowns
    known = torch.isin(
        torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, E_DIM), full).argmin(1), torch.as_tensor(used)
    ).view(-1, 1)
    assert known.any() and (~known).any()
    if unknown_index == "random":  # taming draws on the CPU generator, fastdae on z's device
        assert torch.equal(idx_o[known], idx_t[known]) and int(idx_o.max()) < ours.re_embed
    else:
        assert torch.equal(idx_o, idx_t)
    shape = (2, 5, 5, E_DIM)
    back_t = theirs.get_codebook_entry(idx_o.clone(), shape)  # taming's unmap writes into its input
    assert torch.equal(ours.get_codebook_entry(idx_o, shape), back_t)


def test_validation():
    with pytest.raises(ValueError, match="legacy=True"):
        VectorQuantizer2(8, 4, beta=0.0)
    VectorQuantizer2(8, 4, beta=0.0, legacy=False)
    with pytest.raises(ValueError, match="GumbelQuantize"):
        VectorQuantizer2(8, 4, 0.25)(torch.randn(1, 4, 2, 2), temp=0.5)
    with pytest.raises(ValueError, match=r"\(B, e_dim=4, H, W\)"):
        VectorQuantizer2(8, 4, 0.25)(torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="no taming VectorQuantizer2"):
        patch_vq(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# Inside taming's VQModel: its encode/decode/forward run as written in taming/models/vqgan.py
# (that module imports pytorch_lightning, not installed, so the three methods are compiled from
# its source onto a plain nn.Module holding the same submodules as VQModel.__init__ builds).
# ---------------------------------------------------------------------------------------------
def taming_vqmodel_methods() -> dict:
    import taming

    path = inspect.getfile(taming).replace("__init__.py", "models/vqgan.py")
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "VQModel")
    fns = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in ("encode", "decode", "forward")]
    namespace: dict = {}
    exec(compile(ast.Module(body=fns, type_ignores=[]), path, "exec"), namespace)
    assert set(namespace) >= {"encode", "decode", "forward"}
    return {k: namespace[k] for k in ("encode", "decode", "forward")}


def tiny_vqmodel() -> nn.Module:
    dd = dict(
        double_z=False,
        z_channels=8,
        resolution=16,
        in_channels=3,
        out_ch=3,
        ch=32,
        ch_mult=[1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
    )
    VQModel = type("VQModel", (nn.Module,), taming_vqmodel_methods())
    model = VQModel()
    model.encoder, model.decoder = Encoder(**dd), Decoder(**dd)
    model.quantize = quantize.VectorQuantizer2(N_E, E_DIM, beta=0.25)  # as VQModel.__init__ builds it
    model.quant_conv, model.post_quant_conv = nn.Conv2d(8, E_DIM, 1), nn.Conv2d(E_DIM, 8, 1)
    with torch.no_grad():  # spread the codebook over the encoder's output scale
        model.quantize.embedding.weight.normal_(0, 0.3)
    return model


def test_patch_vq_inside_taming_vqmodel():
    torch.manual_seed(0)
    theirs = tiny_vqmodel()
    ours = patch_vq(copy.deepcopy(theirs))
    assert isinstance(ours.quantize, VectorQuantizer2) and not isinstance(theirs.quantize, VectorQuantizer2)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    results = []
    for model in (theirs, ours):
        quant, emb_loss, info = model.encode(x)
        dec, diff = model(x)
        ((dec - x).abs().mean() + diff).backward()
        results.append((quant, emb_loss, info[2], dec, {n: p.grad for n, p in model.named_parameters()}))
    (q_t, l_t, i_t, d_t, g_t), (q_o, l_o, i_o, d_o, g_o) = results
    assert torch.equal(i_o, i_t) and len(i_t.unique()) > 3
    torch.testing.assert_close(q_o, q_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(l_o, l_t, rtol=1e-5, atol=0)
    torch.testing.assert_close(d_o, d_t, rtol=1e-4, atol=1e-6)
    assert g_o.keys() == g_t.keys()
    for name in g_t:
        torch.testing.assert_close(g_o[name], g_t[name], rtol=1e-3, atol=1e-6, msg=name)


def test_patch_vq_shares_the_codebook_and_keeps_settings(tmp_path):
    np.save(tmp_path / "used.npy", np.arange(0, N_E, 2))
    model = nn.Sequential(
        nn.Identity(),
        quantize.VectorQuantizer2(
            N_E, E_DIM, 0.5, remap=str(tmp_path / "used.npy"), unknown_index="extra", legacy=False
        ),
    ).eval()
    weight = model[1].embedding.weight
    (tmp_path / "used.npy").unlink()  # the checkpoint outlives the remap file: patching must not read it
    patch_vq(model)
    q = model[1]
    assert isinstance(q, VectorQuantizer2) and q.embedding.weight is weight and not q.training
    assert (q.beta, q.legacy, q.re_embed, q.unknown_index) == (0.5, False, N_E // 2 + 1, N_E // 2)
    assert isinstance(patch_vq(quantize.VectorQuantizer2(4, 2, 0.25)), VectorQuantizer2)
