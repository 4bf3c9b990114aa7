import pytest
import torch

from tsq_vllm.core import (
    HessianFactor,
    asymmetric_target,
    damp_hessian,
    gptq_quantize,
    inverse_hessian_factor,
    inverse_rows,
    layer_objective,
    quantize_codes,
    search_grid,
)

from .conftest import correlated_inputs
from .factor_oracle import old_asymmetric_target, old_inverse_hessian_factor


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64])
def test_identity_hessian_gives_round_to_nearest(bits, group_size):
    W = torch.randn(40, 128)
    grid = search_grid(W, bits, group_size, method="minmax", zero_min=1)
    codes, _ = gptq_quantize(W, damp_hessian(torch.eye(128), 0.01), grid, group_size, block_size=32)
    col = torch.arange(128) // group_size
    assert torch.equal(codes, quantize_codes(W, grid.scale[:, col], grid.zero[:, col], bits).long())


@pytest.mark.parametrize("block_size", [16, 128])
def test_gptq_beats_rtn_and_is_block_size_invariant(layer, block_size):
    W, H = layer
    grid = search_grid(W, 3, 64, method="minmax", zero_min=1)
    col = torch.arange(W.shape[1]) // 64
    s, z = grid.scale[:, col], grid.zero[:, col]
    codes, loss = gptq_quantize(W, damp_hessian(H, 0.01), grid, 64, block_size=block_size)
    ref, _ = gptq_quantize(W, damp_hessian(H, 0.01), grid, 64, block_size=64)
    # Lazy batching reorders float sums only: codes agree except for rare ties.
    assert (codes != ref).float().mean() < 1e-3
    # GPTQ's error sum is the damped layer objective, exactly.
    assert loss == pytest.approx(
        layer_objective(W, s * (codes - z), damp_hessian(H, 0.01)), rel=1e-4
    )
    rtn = quantize_codes(W, s, z, 3)
    assert layer_objective(W, s * (codes - z), H) < 0.8 * layer_objective(W, s * (rtn - z), H)


def test_not_positive_definite_is_a_clear_error():
    W = torch.randn(4, 32)
    grid = search_grid(W, 4, 32, method="minmax")
    with pytest.raises(ValueError, match="raise damp"):
        gptq_quantize(W, -torch.eye(32), grid, 32)


def test_asymmetric_target_is_the_least_squares_map_to_the_fp_outputs():
    from .test_stage2 import _moments, _samples

    X, Xt = _samples(K=64, T=2048, noise=0.5)
    H, R, _ = _moments(X, Xt)
    W = torch.randn(24, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    # Oracle: argmin_W' Σ_t ‖W' x_t − W x̃_t‖², by least squares on the token matrices.
    want = torch.linalg.lstsq(X, Xt @ W.t()).solution.t()
    torch.testing.assert_close(asymmetric_target(W, H, R, 1.0), want, rtol=1e-6, atol=1e-8)
    half = asymmetric_target(W, H, R, 0.5)
    torch.testing.assert_close(half, 0.5 * (W + want), rtol=1e-6, atol=1e-8)  # linear in α
    torch.testing.assert_close(asymmetric_target(W, H, R, 0.0), W)


def _damped(K: int, seed: int = 0, dead: int = 0) -> torch.Tensor:
    X = correlated_inputs(K, 4 * K, seed=seed)
    X[:, :dead] = 0  # dead inputs: damp_hessian gives them a unit diagonal
    return damp_hessian(X.t() @ X / X.shape[0], 0.01)  # [K, K] float32, as the pipeline has it


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K", [96, 384])
def test_factor_in_place_gives_the_bits_of_the_two_cholesky_code(dtype, K):
    Hd = _damped(K, seed=K, dead=3)
    W = torch.randn(40, K, generator=torch.Generator().manual_seed(K))
    R = 0.1 * torch.randn(K, K, generator=torch.Generator().manual_seed(K + 1))
    want_U = old_inverse_hessian_factor(Hd, dtype)
    want_W = old_asymmetric_target(W, Hd, R, 0.25, dtype)
    f = HessianFactor(Hd, dtype, solves=1)
    got_W = asymmetric_target(W, f, R, 0.25)
    assert f._L is not None
    buffer = f._L.data_ptr()
    U = f.inverse_factor()
    if dtype == torch.float32:  # U is the buffer L was computed in: the chain ran in place
        assert U.data_ptr() == buffer
    assert torch.equal(got_W, want_W) and got_W.dtype == W.dtype
    assert torch.equal(U, want_U) and U.stride() == want_U.stride()  # GEMMs see the same layout
    assert f._L is None  # the last solve is done and U exists: L was released
    assert torch.equal(inverse_hessian_factor(Hd, dtype), want_U)
    assert torch.equal(asymmetric_target(W, Hd, R, 0.25, dtype), want_W)


@pytest.mark.parametrize("order", [False, True], ids=["natural", "act-order"])
@pytest.mark.parametrize("block_size", [128, 40])
def test_the_loop_reading_float64_rows_gives_the_bits_of_a_float32_factor(
    order, block_size, monkeypatch
):
    """GPTQ converts U a block of rows at a time (no float32 copy of the whole float64 factor):
    codes and loss have the bits of the loop over U converted whole and sliced, as it was."""
    import tsq_vllm.core.gptq as gptq

    K = 320
    Hd = _damped(K, seed=11, dead=2)
    W = torch.randn(24, K, generator=torch.Generator().manual_seed(12))
    grid = search_grid(W, 3, 64, method="minmax", zero_min=1)
    perm = torch.argsort(torch.diagonal(Hd), descending=True) if order else None

    class WholeFloat32(HessianFactor):
        def inverse_factor(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
            U = super().inverse_factor(torch.float32)
            assert U.stride() == (1, K)
            return U

    got = gptq_quantize(W, HessianFactor(Hd, order=perm), grid, 64, block_size=block_size,
                        order=perm)  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(gptq, "inverse_rows", lambda U, i1, i2: U[i1:i2])  # views of the whole U
        want = gptq_quantize(W, WholeFloat32(Hd, order=perm), grid, 64, block_size=block_size,
                             order=perm)  # fmt: skip
    assert torch.equal(got[0], want[0]) and got[1] == want[1]
    U = HessianFactor(Hd).inverse_factor(None)
    assert U.dtype == torch.float64
    rows = inverse_rows(U, 40, 80)
    assert torch.equal(rows, U[40:80].float()) and rows.stride() == (1, 40)


@pytest.mark.parametrize("order", [False, True], ids=["natural", "act-order"])
def test_the_target_solved_in_row_blocks_has_the_bits_of_one_solve(order, monkeypatch):
    """GPTAQ's solve runs a block of W's rows at a time (its float64 temporaries for one block):
    the target has the bits of the whole solve, and the blocks count as one announced solve."""
    import tsq_vllm.core.gptq as gptq

    K = 256
    Hd = _damped(K, seed=21, dead=2)
    W = torch.randn(100, K, generator=torch.Generator().manual_seed(22))
    WR = 0.1 * torch.randn(100, K, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    perm = torch.argsort(torch.diagonal(Hd), descending=True) if order else None
    want = asymmetric_target(W, HessianFactor(Hd, order=perm, solves=1), None, 0.25, WR=WR)
    monkeypatch.setattr(gptq, "_SOLVE_BYTES", 8 * K * 7)  # 7 rows a block: 15 blocks
    f = HessianFactor(Hd, order=perm, solves=2, uses=1)
    got = asymmetric_target(W, f, None, 0.25, WR=WR)
    assert torch.equal(got, want) and got.dtype == W.dtype
    assert f.solves_left == 1 and f._L is not None  # 15 blocks, one solve: L kept for the next


@pytest.mark.parametrize("uses", [3, 1])
def test_factor_shared_by_linears_keeps_l_for_each_solve_and_u_for_each_use(uses):
    """q/k/v: one factor, U asked for between the solves (from a copy of L), a solve and a use
    more than announced (recomputed): every answer is the one a fresh factorization gives, and
    L and U are released after their last announced request."""
    K = 128
    Hd = _damped(K, seed=3)
    R = 0.1 * torch.randn(K, K, generator=torch.Generator().manual_seed(4))
    Ws = [torch.randn(24, K, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    f = HessianFactor(Hd, solves=3, uses=uses)
    for i, W in enumerate(Ws):
        assert torch.equal(
            asymmetric_target(W, f, R, 0.5), old_asymmetric_target(W, Hd, R, 0.5, torch.float64)
        )
        assert torch.equal(f.inverse_factor(), old_inverse_hessian_factor(Hd, torch.float64))
        assert (f._L is None) == (i >= 2)  # kept until the third (announced) solve is done
        assert (f._U is None) == (i + 1 >= uses)  # kept until the last announced use


def test_factor_without_gptq_releases_l_after_the_last_solve():
    """RTN with GPTAQ: no GPTQ pass asks for U, so L goes with the last solve."""
    Hd = _damped(64, seed=8)
    R = 0.1 * torch.randn(64, 64, generator=torch.Generator().manual_seed(8))
    f = HessianFactor(Hd, solves=2, uses=0)
    for i in range(2):
        asymmetric_target(torch.randn(8, 64), f, R, 0.25)
        assert (f._L is None) == (i == 1) and f._U is None


def test_factor_matches_independent_formulas():
    """U against H⁻¹ from torch.linalg.inv and its Cholesky; the target against an explicit
    solve; GPTQ's codes on the factor against GPTQ on that independent U."""
    K = 192
    Hd = _damped(K, seed=5, dead=2).double()
    g = torch.Generator().manual_seed(6)
    W, R = torch.randn(32, K, generator=g), 0.1 * torch.randn(K, K, generator=g)
    f = HessianFactor(Hd.float(), solves=1)
    Hinv = torch.linalg.inv(Hd)
    U_ref = torch.linalg.cholesky(0.5 * (Hinv + Hinv.t()), upper=True)
    target_ref = W.double() - 0.3 * torch.linalg.solve(Hd, (W.double() @ R.double()).t()).t()
    torch.testing.assert_close(
        asymmetric_target(W, f, R, 0.3).double(), target_ref, rtol=1e-5, atol=1e-6
    )
    U = f.inverse_factor()
    torch.testing.assert_close(U.double(), U_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(U.double().t() @ U.double(), Hinv, rtol=1e-4, atol=1e-6)

    class Reference(HessianFactor):
        def inverse_factor(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
            return U_ref.float().t().contiguous().t()  # column-major, like LAPACK's

    grid = search_grid(W, 3, 64, method="minmax", zero_min=1)
    codes, loss = gptq_quantize(W, f, grid, 64)
    codes_ref, loss_ref = gptq_quantize(W, Reference(Hd.float()), grid, 64)
    assert torch.equal(codes, codes_ref)
    assert loss == pytest.approx(loss_ref, rel=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gptq_on_a_shared_factor_gives_the_codes_of_gptq_on_h(bits, dtype):
    Hd = _damped(256, seed=bits)
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(bits))
    grid = search_grid(W, bits, 32, method="minmax", zero_min=1)
    f = HessianFactor(Hd, dtype)
    want = gptq_quantize(W, Hd, grid, 32, factor_dtype=dtype)
    for _ in range(2):  # the second linear of the input reuses U
        codes, loss = gptq_quantize(W, f, grid, 32)
        assert torch.equal(codes, want[0]) and loss == want[1]


def _obs_in_order(W, Hd, scale, zero, group_size, maxq, order):
    """Independent oracle: Optimal Brain Quantization one column at a time in `order`, with the
    inverse of the remaining columns' Hessian recomputed at every step (no Cholesky, no lazy
    blocks), each column on its own group's grid."""
    W = W.double().clone()
    codes = torch.zeros(W.shape, dtype=torch.int64)
    left = list(range(W.shape[1]))
    for j in order.tolist():
        Hinv = torch.linalg.inv(Hd.double()[left][:, left])
        jj = left.index(j)
        g = j // group_size
        c = torch.clamp(torch.round(W[:, j] / scale[:, g].double()) + zero[:, g], 0, maxq)
        codes[:, j] = c.long()
        err = (W[:, j] - scale[:, g].double() * (c - zero[:, g])) / Hinv[jj, jj]
        W[:, left] -= err[:, None] * Hinv[jj][None, :]
        left.remove(j)
    return codes


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block_size", [4, 128])
def test_gptq_in_act_order_with_static_groups_is_obq_in_that_order(seed, block_size):
    g = torch.Generator().manual_seed(seed)
    K, gs = 24, 8
    X = correlated_inputs(K, 256, seed=seed)
    Hd = damp_hessian(X.t() @ X / 256, 0.01).double()
    W = torch.randn(6, K, generator=g, dtype=torch.float64)
    grid = search_grid(W.float(), 3, gs, method="minmax", zero_min=1)
    order = torch.argsort(torch.diagonal(Hd), descending=True)
    assert not torch.equal(order, torch.arange(K))  # the test exercises a real reordering
    codes, loss = gptq_quantize(W, Hd, grid, gs, block_size=block_size, order=order)
    want = _obs_in_order(W, Hd, grid.scale, grid.zero, gs, grid.maxq, order)
    assert torch.equal(codes, want)
    col = torch.arange(K) // gs
    Q = grid.scale[:, col].double() * (codes - grid.zero[:, col])
    dQ = Q - W
    assert loss == pytest.approx(float(((dQ @ Hd) * dQ).sum()), rel=1e-4)


def test_an_ordered_factor_solves_in_input_order_and_must_match_the_loop_order():
    K = 48
    Hd = _damped(K, seed=5)
    order = torch.randperm(K, generator=torch.Generator().manual_seed(0))
    B = torch.randn(K, 7, dtype=torch.float64)
    f = HessianFactor(Hd, torch.float64, solves=1, order=order)
    torch.testing.assert_close(f.solve(B), torch.linalg.solve(Hd.double(), B))
    U = HessianFactor(Hd, torch.float64, order=order).inverse_factor().double()
    Hp = Hd.double()[order][:, order]  # U is the factor of the permuted Hessian's inverse
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(Hp), rtol=1e-4, atol=1e-6)
    W = torch.randn(4, K)
    grid = search_grid(W, 3, 16, method="minmax")
    with pytest.raises(ValueError, match="another column order"):
        gptq_quantize(W, HessianFactor(Hd), grid, 16, order=order)


@pytest.mark.parametrize("K, M", [(48, 7), (300, 40)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_factor_solves_like_cholesky_solve(K, M, dtype):
    """Two triangular solves in place of torch.cholesky_solve (which copies L): Hd⁻¹ B to
    rounding against an LU solve, and cholesky_solve's own bits with this machine's BLAS (the
    byte-identity of checkpoints written before the change rests on it)."""
    Hd = _damped(K, seed=K)
    B = torch.randn(K, M, dtype=dtype, generator=torch.Generator().manual_seed(1))
    f = HessianFactor(Hd, dtype, solves=2)
    X = f.solve(B)
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-4}
    torch.testing.assert_close(X.double(), torch.linalg.solve(Hd.double(), B.double()), **tol)
    assert torch.equal(X, torch.cholesky_solve(B, f._cholesky()))
