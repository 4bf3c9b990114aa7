import itertools

import pytest
import torch

from tsq_vllm.core.bcq import (
    BCQWeight,
    bc_decode,
    bc_encode,
    code_histogram,
    level_candidates,
    map_codes,
    search_levels,
)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_bc_encode_decode_round_trip(k):
    g = torch.Generator().manual_seed(k)
    alpha = torch.rand(k, 5, 7, generator=g) + 0.01  # generic: no two levels coincide
    offset = torch.randn(5, 7, generator=g)
    signs = torch.randint(0, 2, (k, 5, 7), generator=g) * 2 - 1
    x = bc_decode(signs, alpha, offset)
    assert torch.equal(bc_encode(x, alpha, offset), signs.to(torch.int8))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bc_encode_is_nearest_level(k):
    g = torch.Generator().manual_seed(10 + k)
    alpha = torch.randn(k, 50, generator=g)  # any sign: the encoder must not assume alpha >= 0
    offset = torch.randn(50, generator=g)
    x = 3 * torch.randn(50, generator=g)
    got = bc_decode(bc_encode(x, alpha, offset), alpha, offset)
    every = torch.stack(
        [
            bc_decode(torch.tensor(p)[:, None].expand(k, 50), alpha, offset)
            for p in itertools.product((-1, 1), repeat=k)
        ]
    )  # [2^k, 50]
    assert torch.allclose((x - got).abs(), (x - every).abs().amin(0), atol=1e-6)


@pytest.mark.parametrize("k,b0", [(1, 3), (2, 3), (2, 4), (3, 4), (2, 5), (3, 5)])
def test_candidates_are_admissible_and_tables_exact(k, b0):
    cand = level_candidates(k, b0)
    M = (1 << b0) - 1
    assert (
        (cand.low >= 0).all()
        and (cand.steps >= 0).all()
        and (cand.low + cand.steps.sum(1) <= M).all()
    )
    assert (cand.steps[:, :-1] >= cand.steps[:, 1:]).all()
    beta = torch.tensor(list(itertools.product((0, 1), repeat=k)))  # [2^k, k]
    levels = cand.low[:, None] + cand.steps @ beta.t()  # [C, 2^k], all integer levels in [0, M]
    x = torch.arange(M + 1)
    nearest = (x[None, :, None] - levels[:, None, :]).abs().amin(-1)  # [C, M+1]
    assert torch.equal((x - cand.mapped).abs(), nearest)
    assert torch.equal(cand.error, nearest.square().float())
    # The sign pattern of each mapped code reproduces it (pattern bit i is b_i = +1).
    bits = (cand.pattern[..., None] >> torch.arange(k)) & 1  # [C, M+1, k]
    assert torch.equal(cand.low[:, None] + (bits * cand.steps[:, None, :]).sum(-1), cand.mapped)
    # Only maximal, distinct level sets are kept.
    sets = [frozenset(r) for r in levels.tolist()]
    assert len(set(sets)) == len(sets)
    if len(sets) < 600:
        assert not any(a < b for a in sets for b in sets)


def _brute_force_cost(codes, h, group_size, k, b0):
    """Min over every admissible (α, c) on the half-integer lattice, any sign and order of α."""
    M = (1 << b0) - 1
    half = torch.arange(-M, M + 1, dtype=torch.float64) / 2
    alphas = torch.cartesian_prod(*([half] * k)).reshape(-1, k)
    combos = torch.cat(
        [
            alphas.repeat_interleave(2 * M + 1, 0),
            (torch.arange(2 * M + 1, dtype=torch.float64) / 2).repeat(len(alphas))[:, None],
        ],
        1,
    )
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=k)), dtype=torch.float64)
    levels = combos[:, :k] @ signs.t() + combos[:, k:]  # [T, 2^k]
    ok = ((levels == levels.round()) & (levels >= 0) & (levels <= M)).all(1)
    levels = levels[ok]
    x = torch.arange(M + 1, dtype=torch.float64)
    E = (x[None, :, None] - levels[:, None, :]).abs().amin(-1).square()  # [A, M+1]
    N, K = codes.shape
    out = torch.empty(N, K // group_size, dtype=torch.float64)
    for n in range(N):
        for gi in range(K // group_size):
            sl = slice(gi * group_size, (gi + 1) * group_size)
            per = E[:, codes[n, sl]] * h[sl].double()  # [A, g]
            out[n, gi] = per.sum(1).min()
    return out


@pytest.mark.parametrize("k,b0", [(1, 3), (2, 3), (1, 4), (2, 4), (3, 4), (2, 5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_critical_points_match_brute_force(k, b0, seed):
    g = torch.Generator().manual_seed(seed)
    M = (1 << b0) - 1
    N, K, G = 3, 64, 16
    # Bell-shaped and skewed codes, like GPTQ's, with uneven column weights.
    centre = torch.randint(0, M + 1, (N, 1), generator=g).float()
    codes = (centre + (M / 4) * torch.randn(N, K, generator=g)).round().clamp(0, M).long()
    h = torch.rand(K, generator=g).square() + 1e-3
    best, cost = search_levels(code_histogram(codes, h, G, b0), level_candidates(k, b0))
    expected = _brute_force_cost(codes, h, G, k, b0)
    torch.testing.assert_close(cost.double(), expected, rtol=1e-5, atol=1e-6)
    # The reported cost is the cost of the codes it maps to.
    mapped, _ = map_codes(codes, best, level_candidates(k, b0), G)
    direct = ((codes - mapped).double().square() * h.double()).reshape(N, -1, G).sum(-1)
    torch.testing.assert_close(cost.double(), direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,b0", [(2, 4), (3, 4), (2, 5), (3, 5)])
def test_mapped_codes_take_at_most_2k_values(k, b0):
    g = torch.Generator().manual_seed(5)
    M = (1 << b0) - 1
    codes = torch.randint(0, M + 1, (16, 128), generator=g)
    cand = level_candidates(k, b0)
    best, _ = search_levels(code_histogram(codes, torch.rand(128, generator=g), 32, b0), cand)
    mapped, signs = map_codes(codes, best, cand, 32)
    assert (mapped >= 0).all() and (mapped <= M).all()
    for row in mapped.reshape(-1, 32):
        assert len(set(row.tolist())) <= 1 << k
    beta = (signs.long() + 1) // 2
    d = cand.steps[best].repeat_interleave(32, dim=1).movedim(-1, 0)
    assert torch.equal(cand.low[best].repeat_interleave(32, dim=1) + (d * beta).sum(0), mapped)


@pytest.mark.parametrize("k,b0", [(2, 4), (3, 5)])
def test_codes_already_on_a_level_set_are_kept(k, b0):
    g = torch.Generator().manual_seed(7)
    cand = level_candidates(k, b0)
    pick = torch.randint(0, len(cand.low), (4, 2), generator=g)  # a random admissible set per group
    levels = cand.mapped[pick]  # [4, 2, M+1]: its levels are the values this table takes
    x = torch.randint(0, 1 << b0, (4, 2, 32), generator=g)
    codes = levels.gather(2, x).reshape(4, 64)
    best, cost = search_levels(code_histogram(codes, torch.ones(64), 32, b0), cand)
    assert (cost == 0).all()
    assert torch.equal(map_codes(codes, best, cand, 32)[0], codes)


def _bcq_weight(k=3, b0=4, N=6, K=64, G=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cand = level_candidates(k, b0)
    best = torch.randint(0, len(cand.low), (N, K // G), generator=g)
    codes, signs = map_codes(torch.randint(0, 1 << b0, (N, K), generator=g), best, cand, G)
    scale = torch.rand(N, K // G, generator=g) + 0.1
    zero = torch.randint(1, 1 << b0, (N, K // G), generator=g)
    return BCQWeight(codes, scale, zero, cand.low[best], cand.steps[best], signs, b0, G)


@pytest.mark.parametrize("k,b0", [(2, 4), (3, 4), (3, 5)])
def test_bcq_weight_decodes_agree(k, b0):
    bw = _bcq_weight(k, b0)
    torch.testing.assert_close(bw.dequantize_bcq(), bw.dequantize(), rtol=1e-6, atol=1e-5)
    assert bw.scaled_alpha().shape == (6, 2, k) and bw.scaled_offset().shape == (6, 2)


def test_bcq_weight_rejects_inconsistent_parts():
    bw = _bcq_weight()
    codes = bw.codes.clone()
    codes[0, 0] = (codes[0, 0] + 1) % 16
    with pytest.raises(ValueError, match="disagree"):
        BCQWeight(codes, bw.scale, bw.zero, bw.low, bw.steps, bw.signs, 4, 32)
    with pytest.raises(ValueError, match="signs has shape"):
        BCQWeight(bw.codes, bw.scale, bw.zero, bw.low, bw.steps, bw.signs[:, :, :32], 4, 32)
    steps = bw.steps.clone()
    steps[0, 0, 0] = 16
    with pytest.raises(ValueError, match="m \\+ sum\\(d\\) <= 15"):
        BCQWeight(bw.codes, bw.scale, bw.zero, bw.low, steps, bw.signs, 4, 32)


@pytest.mark.parametrize("k,b0", [(3, 3), (0, 4), (2, 6)])
def test_unsupported_bits(k, b0):
    with pytest.raises(ValueError, match="b0="):
        level_candidates(k, b0)
