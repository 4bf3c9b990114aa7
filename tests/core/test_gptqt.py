import itertools

import pytest
import torch

from tsq_vllm.core import damp_hessian, gptq_quantize, layer_objective, search_grid
from tsq_vllm.core.gptqt import (
    GPTQTSettings,
    Reexplore,
    gptq_quantize_levels,
    gptqt_convert,
)

from .test_stage2 import _streams

G = 64


def _first_pass(W, H, b0):
    Hd = damp_hessian(H, 0.01)
    grid = search_grid(W, b0, G, method="hessian", H=Hd, zero_min=1)
    codes, _ = gptq_quantize(W, Hd, grid, G)
    return grid, codes, Hd


def _row_losses(W, Q, H, R=None):
    D = (Q - W).double()
    loss = ((D @ H.double()) * D).sum(1)
    if R is not None:
        loss += 2 * ((W.double() @ R.double()) * D).sum(1)
    return loss


def test_identity_tables_reproduce_gptq(layer):
    W, H = layer
    grid, codes, Hd = _first_pass(W, H, 4)
    n_g = W.shape[1] // G
    identity = torch.arange(16).expand(W.shape[0], n_g, 16)
    assert torch.equal(gptq_quantize_levels(W, Hd, grid, identity, G), codes)


@pytest.mark.parametrize("k,b0", [(2, 4), (3, 4), (2, 5), (3, 5)])
@pytest.mark.parametrize("requantize", [False, True])
def test_converted_codes_are_b0_codes_on_2k_levels(layer, k, b0, requantize):
    W, H = layer
    grid, codes, Hd = _first_pass(W, H, b0)
    bw = gptqt_convert(W, H, codes, grid, G, GPTQTSettings(k, requantize=requantize), H_damped=Hd)
    assert (bw.codes >= 0).all() and (bw.codes <= (1 << b0) - 1).all()
    assert max(len(set(r.tolist())) for r in bw.codes.reshape(-1, G)) <= 1 << k
    torch.testing.assert_close(bw.dequantize_bcq(), bw.dequantize(), rtol=1e-5, atol=1e-5)
    assert bw.stats["loss"] == pytest.approx(layer_objective(W, bw.dequantize(), H), rel=1e-4)
    beta = torch.tensor(list(itertools.product((0, 1), repeat=k)))  # [2^k, k]
    levels = (bw.low[..., None] + bw.steps @ beta.t()).repeat_interleave(G, 1)  # [N, K, 2^k]
    assert (levels == bw.codes[..., None]).any(-1).all()  # every code is a level of its group
    if not requantize:  # the direct conversion maps each first-pass code to its nearest level
        assert torch.equal((bw.codes - codes).abs(), (levels - codes[..., None]).abs().amin(-1))


@pytest.mark.parametrize("k,b0", [(2, 4), (3, 4), (3, 5)])
def test_requantization_beats_direct_mapping(layer, k, b0):
    W, H = layer
    grid, codes, Hd = _first_pass(W, H, b0)
    direct = gptqt_convert(W, H, codes, grid, G, GPTQTSettings(k, requantize=False, reexplore=None))
    twice = gptqt_convert(W, H, codes, grid, G, GPTQTSettings(k, reexplore=None), H_damped=Hd)
    assert twice.stats["loss"] < 0.85 * direct.stats["loss"]


@pytest.mark.parametrize("k,b0", [(2, 4), (3, 4), (2, 5)])
@pytest.mark.parametrize("requantize", [False, True])
@pytest.mark.parametrize("stage2", [False, True])
@pytest.mark.parametrize("with_r", [False, True])
def test_reexploration_never_worse_on_the_layer_loss(k, b0, requantize, stage2, with_r):
    g = torch.Generator().manual_seed(4)
    H, R = _streams(K=256, T=1024)
    R = R if with_r else None
    W = torch.randn(48, 256, generator=g)
    grid, codes, Hd = _first_pass(W, H, b0)
    common = {"R": R, "H_damped": Hd}
    none = gptqt_convert(
        W, H, codes, grid, G, GPTQTSettings(k, requantize, reexplore=None), **common
    )
    rx = gptqt_convert(
        W, H, codes, grid, G, GPTQTSettings(k, requantize, Reexplore(stage2=stage2)), **common
    )
    assert torch.equal(rx.codes, none.codes)  # re-exploration only moves scales
    before, after = _row_losses(W, none.dequantize(), H, R), _row_losses(W, rx.dequantize(), H, R)
    assert (after <= before + 1e-5 * before.abs()).all()
    assert after.sum() < before.sum()
    assert rx.stats["loss_mapped"] == pytest.approx(float(before.sum()), rel=1e-4)
    assert rx.stats["loss"] == pytest.approx(float(after.sum()), rel=1e-4)


@pytest.mark.parametrize("lowest,highest,points", [(0.8, 1.2, 41), (0.5, 1.5, 11)])
def test_grid_search_is_the_best_multiplier_per_group(layer, lowest, highest, points):
    W, H = layer
    grid, codes, Hd = _first_pass(W, H, 4)
    opts = Reexplore(lowest, highest, points, stage2=False)
    settings = GPTQTSettings(3, reexplore=None)
    base = gptqt_convert(W, H, codes, grid, G, settings, H_damped=Hd)
    rx = gptqt_convert(W, H, codes, grid, G, GPTQTSettings(3, reexplore=opts), H_damped=Hd)
    N, K = W.shape
    U = (base.codes - base.zero.repeat_interleave(G, 1)).double().reshape(N, -1, G)
    Wg = W.double().reshape(N, -1, G)
    blocks = torch.stack([H[i : i + G, i : i + G] for i in range(0, K, G)]).double()

    def block_loss(scale):
        D = scale.double()[..., None] * U - Wg
        return torch.einsum("nig,igh,nih->ni", D, blocks, D)  # [N, n_g]

    kept = (rx.scale != base.scale).any(1)  # rows the final layer-loss check did not revert
    assert kept.any()
    chosen = block_loss(rx.scale)[kept]
    gammas = torch.cat([torch.linspace(lowest, highest, points), torch.ones(1)])
    every = torch.stack([block_loss(gm * base.scale)[kept] for gm in gammas])
    assert (chosen <= every.amin(0) + 1e-6 * every.abs().amax(0)).all()
    ratio = rx.scale[kept] / base.scale[kept]
    assert (ratio >= lowest - 1e-6).all() and (ratio <= highest + 1e-6).all()


def test_deterministic(layer):
    W, H = layer
    grid, codes, Hd = _first_pass(W, H, 4)
    a = gptqt_convert(W, H, codes, grid, G, GPTQTSettings(3), H_damped=Hd)
    b = gptqt_convert(W, H, codes, grid, G, GPTQTSettings(3), H_damped=Hd)
    assert (
        torch.equal(a.codes, b.codes)
        and torch.equal(a.scale, b.scale)
        and torch.equal(a.signs, b.signs)
    )


def test_bad_inputs(layer):
    W, H = layer
    grid, codes, _ = _first_pass(W, H, 4)
    with pytest.raises(ValueError, match="k=4 must satisfy"):
        gptqt_convert(W, H, codes, grid, G, GPTQTSettings(4))
    bad = codes.clone()
    bad[0, 0] = 16
    with pytest.raises(ValueError, match="outside \\[0, 15\\]"):
        gptqt_convert(W, H, bad, grid, G, GPTQTSettings(3))
    with pytest.raises(ValueError, match="H \\[K, K\\]"):
        gptqt_convert(W, H[:-1, :-1], codes, grid, G, GPTQTSettings(3))
    with pytest.raises(ValueError, match="lowest <= 1 <= highest"):
        Reexplore(1.1, 1.2)
