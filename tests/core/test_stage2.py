import pytest
import torch

from tsq_vllm.core import (
    damp_hessian,
    energy_match,
    gptq_quantize,
    layer_objective,
    output_stats,
    refine_scales,
    scale_system,
    search_grid,
)

from .conftest import correlated_inputs


def _gptq_state(W, H, bits, group_size):
    grid = search_grid(W, bits, group_size, method="minmax", zero_min=1)
    codes, _ = gptq_quantize(W, damp_hessian(H, 0.01), grid, group_size)
    col = torch.arange(W.shape[1]) // group_size
    return grid, (codes - grid.zero[:, col]).float(), col


def _streams(K=256, T=2048, noise=0.3, seed=0):
    """Full-precision inputs X̃, and quantized-stream inputs X = X̃ + ΔX with ΔX correlated to X̃."""
    g = torch.Generator().manual_seed(seed + 7)
    Xt = correlated_inputs(K, T, seed)
    dX = noise * (Xt @ (torch.randn(K, K, generator=g) / K**0.5)) + 0.05 * torch.randn(
        T, K, generator=g
    )
    X = Xt + dX
    return X.t() @ X / T, dX.t() @ X / T


@pytest.mark.parametrize("with_r", [False, True])
@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 32)])
def test_objective_never_increases(layer, with_r, bits, group_size):
    W, H = layer
    R = None
    if with_r:
        H, R = _streams()
    grid, U, col = _gptq_state(W, H, bits, group_size)
    res = refine_scales(W, U, grid.scale, H, R, group_size, max_sweeps=8, rtol=0)
    obj = res.objective
    assert 2 <= len(obj) <= 9
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(obj, obj[1:], strict=False))
    assert obj[-1] < obj[0]
    # The tracked objective is eq. (7) up to a constant: check it against a direct evaluation.
    direct_before = layer_objective(W, grid.scale[:, col] * U, H, R)
    direct_after = layer_objective(W, res.scale[:, col] * U, H, R)
    assert direct_before - direct_after == pytest.approx(obj[0] - obj[-1], rel=1e-3)


@pytest.mark.parametrize("with_r", [False, True])
def test_single_group_is_the_exact_least_squares_scale(with_r):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 64, generator=g)
    H, R = _streams(K=64, T=512)
    R = R if with_r else None
    grid, U, _ = _gptq_state(W, H, 3, 64)
    res = refine_scales(W, U, grid.scale, H, R, 64, max_sweeps=1)
    # dL/ds = 0 for L(s) = (sU − W)H(sU − W)ᵀ + 2 W R (sU − W)ᵀ, one row at a time.
    num = ((U @ H) * W).sum(-1)
    if R is not None:
        num -= ((W @ R) * U).sum(-1)
    exact = num / ((U @ H) * U).sum(-1)
    torch.testing.assert_close(res.scale[:, 0], exact, rtol=1e-4, atol=1e-6)


def test_zero_codes_keep_their_scale():
    W = torch.randn(4, 64)
    U = torch.randn(4, 64).round()
    U[1, :32] = 0  # group 0 of row 1 has every code at the zero point
    scale = torch.full((4, 2), 0.5)
    res = refine_scales(W, U, scale, torch.eye(64), None, 32)
    assert res.scale[1, 0] == 0.5
    assert torch.isfinite(res.scale).all()


# --- box constraint, damped error feedback, true eq. (7) statistics -------------------------------


def _samples(K=128, T=1024, noise=0.4, seed=0):
    """Token matrices [T, K]: X̃ (full precision) and X = X̃ + ΔX, ΔX correlated with X̃."""
    g = torch.Generator().manual_seed(seed + 11)
    Xt = correlated_inputs(K, T, seed)
    dX = noise * (Xt @ (torch.randn(K, K, generator=g) / K**0.5)) + 0.05 * torch.randn(
        T, K, generator=g
    )
    return (Xt + dX).double(), Xt.double()


def _moments(X, Xt):
    dX = X - Xt
    T = X.shape[0]
    return X.t() @ X / T, dX.t() @ X / T, dX.t() @ dX / T


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("box", [1.25, 2.0, 4.0])
@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64)])
def test_box_keeps_scales_positive_and_loss_monotone(layer, alpha, box, bits, group_size):
    W, _ = layer
    H, R = _streams(noise=0.6)
    grid, U, _ = _gptq_state(W, H, bits, group_size)
    res = refine_scales(
        W, U, grid.scale, H, R, group_size, alpha=alpha, box=box, max_sweeps=10, rtol=0
    )
    obj = res.objective
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(obj, obj[1:], strict=False))
    s0 = grid.scale.double()
    s = res.scale.double()
    assert (s > 0).all()
    assert (s >= s0 / box * (1 - 1e-6)).all() and (s <= s0 * box * (1 + 1e-6)).all()


def test_unbounded_stage2_can_flip_signs_and_the_box_binds():
    """The case the box exists for: strong error feedback drives some scales below zero."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(64, 256, generator=g)
    H, R = _streams(noise=1.5, seed=2)
    grid, U, _ = _gptq_state(W, H, 2, 32)
    free = refine_scales(W, U, grid.scale, H, R, 32, max_sweeps=20)
    boxed = refine_scales(W, U, grid.scale, H, R, 32, box=2.0, max_sweeps=20)
    assert (free.scale < 0).any()
    assert (boxed.scale > 0).all()
    assert (
        boxed.objective[-1] >= free.objective[-1]
    )  # a constrained minimum cannot beat the free one


@pytest.mark.parametrize("with_r", [False, True])
def test_wide_box_equals_unconstrained(layer, with_r):
    W, H = layer
    R = None
    if with_r:
        H, R = _streams()
    grid, U, _ = _gptq_state(W, H, 3, 64)
    free = refine_scales(W, U, grid.scale, H, R, 64, max_sweeps=6, rtol=0)
    wide = refine_scales(W, U, grid.scale, H, R, 64, box=1e6, max_sweeps=6, rtol=0)
    assert torch.equal(free.scale, wide.scale)
    assert free.objective == wide.objective


def _box_qp_oracle(A, b, lo, hi):
    """argmin sᵀAs − 2bᵀs over the 2-D box [lo, hi], by enumerating the KKT candidates."""

    def f(s):
        return float(s @ A @ s - 2 * b @ s)

    cands = [torch.linalg.solve(A, b)]
    for i in range(2):
        j = 1 - i
        for v in (lo[i], hi[i]):  # s_i fixed on an edge, s_j minimized on its interval
            s = torch.empty(2, dtype=A.dtype)
            s[i] = v
            s[j] = torch.clamp((b[j] - A[j, i] * v) / A[j, j], lo[j], hi[j])
            cands.append(s)
    feasible = [s for s in cands if bool(((s >= lo - 1e-12) & (s <= hi + 1e-12)).all())]
    return min(feasible, key=f)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_box_result_is_the_constrained_minimum_on_two_groups(alpha):
    g = torch.Generator().manual_seed(9)
    W = torch.randn(48, 64, generator=g)
    H, R = _streams(K=64, T=512, noise=1.0, seed=3)
    grid, U, _ = _gptq_state(W, H, 2, 32)
    box = 1.05  # tight enough that the bounds bind on many rows
    res = refine_scales(W, U, grid.scale, H, R, 32, alpha=alpha, box=box, max_sweeps=500, rtol=0)
    sys = scale_system(W, U, H, R, 32)
    s0 = grid.scale.double()
    bound = 0  # coordinates of the oracle's solution that lie on an edge of the box
    for n in range(W.shape[0]):
        want = _box_qp_oracle(sys.A[n].double(), sys.b(alpha)[n], s0[n] / box, s0[n] * box)
        torch.testing.assert_close(res.scale[n].double(), want, rtol=1e-5, atol=1e-8)
        bound += int((torch.isclose(want, s0[n] / box) | torch.isclose(want, s0[n] * box)).sum())
    assert bound >= 10  # the oracle really exercised the box
    assert res.at_bound == bound


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_damped_error_feedback_converges_to_the_damped_normal_equations(layer, alpha):
    W, _ = layer
    H, R = _streams()
    grid, U, _ = _gptq_state(W, H, 3, 64)
    res = refine_scales(W, U, grid.scale, H, R, 64, alpha=alpha, max_sweeps=400, rtol=0)
    # Independent oracle: solve A s = Σ_k u_kᵀ[(H − αRᵀ)w] per row with a dense solver.
    Hd, Rd, Ud, Wd = H.double(), R.double(), U.double(), W.double()
    n_g = 256 // 64
    Ug = torch.zeros(W.shape[0], 256, n_g, dtype=torch.float64)  # column i = u_i in group i's slots
    for i in range(n_g):
        Ug[:, i * 64 : (i + 1) * 64, i] = Ud[:, i * 64 : (i + 1) * 64]
    A = Ug.transpose(1, 2) @ Hd @ Ug
    b = torch.einsum("nki,nk->ni", Ug, Wd @ (Hd - alpha * Rd))
    want = torch.linalg.solve(A, b)
    torch.testing.assert_close(res.scale.double(), want, rtol=1e-4, atol=1e-7)
    if alpha == 0:
        no_r = refine_scales(W, U, grid.scale, H, None, 64, max_sweeps=400, rtol=0)
        torch.testing.assert_close(res.scale, no_r.scale)


@pytest.mark.parametrize("with_r", [False, True])
def test_output_stats_match_token_level_errors(with_r):
    X, Xt = _samples()
    if not with_r:
        Xt = X
    H, R, D = _moments(X, Xt)
    g = torch.Generator().manual_seed(5)
    W = torch.randn(40, 128, generator=g, dtype=torch.float64)
    grid, U, col = _gptq_state(W.float(), H.float(), 2, 32)
    Q = (grid.scale[:, col] * U).double()
    loss = float(
        ((X @ Q.t() - Xt @ W.t()) ** 2).sum() / X.shape[0]
    )  # E‖QX − WX̃‖², summed over rows
    fp = float(((Xt @ W.t()) ** 2).sum() / X.shape[0])
    qe = float(((X @ Q.t()) ** 2).sum() / X.shape[0])
    Rr, Dr = (R, D) if with_r else (None, None)
    for st in (
        output_stats(W, Q, H, Rr, Dr),
        scale_system(W, U, H, Rr, 32, D=Dr).output_stats(grid.scale),
    ):
        assert st.loss == pytest.approx(loss, rel=1e-5)
        assert st.fp_energy == pytest.approx(fp, rel=1e-5)
        assert st.q_energy == pytest.approx(qe, rel=1e-5)
        assert st.rel_error == pytest.approx(loss / fp, rel=1e-5)
        assert st.energy_ratio == pytest.approx(qe / fp, rel=1e-5)
    err_h = float((((Q - W) @ H) * (Q - W)).sum())
    assert output_stats(W, Q, H, Rr, Dr, err_h=err_h).q_energy == pytest.approx(qe, rel=1e-5)


def test_energy_match_restores_each_rows_fp_energy():
    X, Xt = _samples(seed=1)
    H, R, D = (m.float() for m in _moments(X, Xt))
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(8))
    grid, U, col = _gptq_state(W, H, 2, 32)
    sys = scale_system(W, U, H, R, 32, D=D)
    res = refine_scales(W, U, grid.scale, H, R, 32, box=4.0, system=sys)
    s = energy_match(sys, res.scale)
    Q = (s[:, col] * U).double()
    per_row_q = ((X @ Q.t()) ** 2).mean(0)  # [N]
    per_row_fp = ((Xt @ W.double().t()) ** 2).mean(0)
    torch.testing.assert_close(per_row_q, per_row_fp, rtol=1e-4, atol=0)
    assert (s > 0).all()
    ratio = s.double() / res.scale.double()
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))  # one factor per row


def test_box_below_one_is_an_error():
    with pytest.raises(ValueError, match="at least 1"):
        refine_scales(
            torch.ones(1, 4), torch.ones(1, 4), torch.ones(1, 1), torch.eye(4), None, 4, box=0.5
        )


@pytest.mark.parametrize("widen_bytes", [1 << 26, 3 * 8 * 8 * 8])  # one block; 3 rows a block
def test_a_float32_system_gives_the_bits_of_its_float64_copy(widen_bytes, monkeypatch):
    """A is stored in float32 (its entries are float32 GEMM results) and widened where it is
    read: the sweeps, the objective and the energies have the bits of the same system held in
    float64, whether the energy widens A whole or a few rows at a time."""
    import dataclasses

    import tsq_vllm.core.stage2 as stage2
    from tsq_vllm.core.stage2 import refine_system

    H, R = _streams(K=512, seed=3)
    W = torch.randn(40, 512, generator=torch.Generator().manual_seed(4))
    grid, U, _ = _gptq_state(W, H, 3, 64)
    sys32 = scale_system(W, U, H, R, 64)
    assert sys32.A.dtype == torch.float32 and sys32.A.shape == (40, 8, 8)
    sys64 = dataclasses.replace(sys32, A=sys32.A.double())
    monkeypatch.setattr(stage2, "_WIDEN_BYTES", widen_bytes)
    s = grid.scale.double()
    old = (s * torch.einsum("nij,nj->ni", sys64.A, s)).sum(-1)  # the float64 system's formula
    assert torch.equal(sys32.q_energy(s), old)
    for box in (None, 2.0):
        a = refine_system(sys32, grid.scale, alpha=0.25, box=box)
        b = refine_system(sys64, grid.scale, alpha=0.25, box=box)
        assert torch.equal(a.scale, b.scale) and a.objective == b.objective
