import pytest
import torch

from tsq_vllm.core import DampedHessian, HessianAccumulator, damp_hessian, dead_columns

from .factor_oracle import old_moments


def test_running_mean_matches_batch_statistics():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 50, 16, generator=g)
    X_fp = X + 0.1 * torch.randn(3, 50, 16, generator=g)
    acc = HessianAccumulator(16, with_r=True)
    for i in range(3):  # uneven batches
        acc.add(X[i, :7], X_fp[i, :7])
        acc.add(X[i, 7:], X_fp[i, 7:])
    H, R = acc.finalize()
    Xf, Xt = X.reshape(-1, 16).double(), X_fp.reshape(-1, 16).double()
    torch.testing.assert_close(H.double(), Xf.t() @ Xf / 150, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(R.double(), (Xf - Xt).t() @ Xf / 150, rtol=1e-5, atol=1e-6)
    assert acc.count == 150


def test_r_needs_full_precision_stream():
    acc = HessianAccumulator(4, with_r=True)
    try:
        acc.add(torch.ones(2, 4))
    except ValueError as e:
        assert "x_fp" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_empty_accumulator_is_an_error():
    try:
        HessianAccumulator(4).finalize()
    except ValueError as e:
        assert "no calibration tokens" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_damping_and_dead_columns():
    X = torch.randn(100, 6)
    X[:, 2] = 0
    H = X.t() @ X / 100
    assert dead_columns(H).tolist() == [False, False, True, False, False, False]
    Hd = damp_hessian(H, 0.01)
    assert Hd[2, 2] > 1 and torch.count_nonzero(Hd[2]) == 1
    torch.linalg.cholesky(Hd)  # positive definite
    live = torch.tensor([0, 1, 3, 4, 5])
    lam = 0.01 * torch.diagonal(H)[live].mean()
    torch.testing.assert_close(torch.diagonal(Hd)[live], torch.diagonal(H)[live] + lam)


def _damped_copy(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The oracle: H + λI written out on a copy, dead rows and columns zeroed, unit diagonal."""
    H = H.clone()
    dead = torch.diagonal(H) <= 0
    H[dead, :] = 0
    H[:, dead] = 0
    diag = torch.diagonal(H)
    diag[dead] = 1
    diag += damp * diag[~dead].mean()
    return H


@pytest.mark.parametrize("dead", [[], [2], [0, 5, 6]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_damped_view_has_the_bits_of_the_damped_copy(dead, dtype):
    """DampedHessian reads a damped copy's entries from H: the same bits everywhere, including a
    −0 off the diagonal, the dead rows and columns, and every way it is read."""
    X = torch.randn(64, 7, generator=torch.Generator().manual_seed(len(dead)), dtype=dtype)
    X[:, dead] = 0
    H = X.t() @ X / 64
    H[1, 3] = H[3, 1] = -0.0
    want = _damped_copy(H, 0.01)
    Hd = DampedHessian.of(H, 0.01)
    got = Hd.dense()
    assert torch.equal(damp_hessian(H, 0.01), want)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))  # −0 stays −0
    assert torch.equal(Hd.diagonal(), torch.diagonal(want))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(Hd.rows(perm[:3], perm), want[perm[:3]][:, perm])
    idx = torch.arange(6).reshape(3, 2)  # [n_groups, g]: stage 1's diagonal blocks
    assert torch.equal(
        Hd.at(idx[:, :, None], idx[:, None, :]), want[idx[:, :, None], idx[:, None, :]]
    )


def test_delta_gram_matches_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2, 40, 8, generator=g)
    X_fp = X + 0.3 * torch.randn(2, 40, 8, generator=g)
    acc = HessianAccumulator(8, with_r=True)
    for i in range(2):
        for lo, hi in ((0, 13), (13, 40)):
            acc.add(X[i, lo:hi], X_fp[i, lo:hi])
    dX = (X - X_fp).reshape(-1, 8).double()
    D = acc.finalize_delta()
    torch.testing.assert_close(D.double(), dX.t() @ dX / 80, rtol=1e-5, atol=1e-6)
    assert torch.equal(D, D.t())
    assert HessianAccumulator(8).finalize_delta() is None  # no FP stream: nothing to track


def test_the_fp_stream_terms_accumulate_in_float32_beside_a_float64_h():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, 8, generator=g)
    x_fp = x + 0.1 + 0.2 * torch.randn(3, 50, 8, generator=g)
    acc = HessianAccumulator(8, with_r=True)
    per = HessianAccumulator(8, with_r=True, weights=[torch.randn(5, 8, generator=g)])
    for a, b in zip(x, x_fp, strict=True):
        acc.add(a, b)
        per.add(a, b)
    assert acc.H.dtype == torch.float64 and acc.R.dtype == acc.D.dtype == torch.float32
    assert per._WR[0].dtype == torch.float32 and per._wdw[0].dtype == torch.float64
    # Against float64 formulas on the same tokens: float32's rounding, nothing more.
    X, dX = x.reshape(-1, 8).double(), (x - x_fp).reshape(-1, 8).double()
    torch.testing.assert_close(acc.R.double(), dX.t() @ X / 150, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.D.double(), dX.t() @ dX / 150, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_r", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K", [24, 1100])  # 1100: the symmetrization takes two row blocks
def test_take_gives_the_bits_of_the_whole_matrix_formulas_and_releases(with_r, dtype, K):
    g = torch.Generator().manual_seed(K)
    acc = HessianAccumulator(K, with_r=with_r, dtype=dtype)
    X = torch.randn(2, 64, K, generator=g)
    for x in X:
        acc.add(x, x + 0.1 * torch.randn(x.shape, generator=g) if with_r else None)
    want = old_moments(acc)
    assert torch.equal(acc.finalize()[0], want[0])  # finalize is the same formula, repeatable
    if with_r:
        assert torch.equal(acc.finalize_delta(), want[2])
    got = acc.take()
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b) and a.dtype == torch.float32
    assert acc.H.numel() == 0 and acc.R is None and acc.D is None  # the accumulators are freed
    with pytest.raises(ValueError, match="no calibration tokens"):
        acc.take()


@pytest.mark.parametrize("N", [3, 9])
def test_feedback_through_the_weights_equals_the_k_by_k_moments(N):
    """Given the reading linears' weights, the accumulator tracks W R and wᵀDw per row instead
    of R and D: the same quantities (to rounding) from 2·T·K·N products, and no K×K matrix."""
    g = torch.Generator().manual_seed(N)
    K = 8
    X = torch.randn(3, 40, K, generator=g)
    X_fp = X + 0.3 * torch.randn(3, 40, K, generator=g)
    Ws = [torch.randn(N, K, generator=g), torch.randn(2, K, generator=g)]
    full, per = HessianAccumulator(K, with_r=True), HessianAccumulator(K, with_r=True, weights=Ws)
    for i in range(3):
        for lo, hi in ((0, 11), (11, 40)):
            full.add(X[i, lo:hi], X_fp[i, lo:hi])
            per.add(X[i, lo:hi], X_fp[i, lo:hi])
    H, R, D = full.take()
    H2, R2, D2 = per.take()
    assert torch.equal(H, H2) and R2 is None and D2 is None
    assert full.take_feedback() is None
    fbs = per.take_feedback()
    assert fbs is not None and len(fbs) == 2
    for W, fb in zip(Ws, fbs, strict=True):
        torch.testing.assert_close(fb.WR.double(), W.double() @ R.double(), rtol=1e-5, atol=1e-6)
        wdw = ((W.double() @ D.double()) * W.double()).sum(-1)
        torch.testing.assert_close(fb.w_d_w, wdw, rtol=1e-5, atol=1e-6)
        assert fb.rows(slice(1, 2)).WR.shape == (1, K)
    with pytest.raises(ValueError, match="full-precision stream"):
        HessianAccumulator(K, weights=Ws)
