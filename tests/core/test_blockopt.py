"""Block-output scale refinement (core.blockopt) on linear "blocks" with known answers."""

from __future__ import annotations

import pytest
import torch

from tsq_vllm.core.blockopt import LogScales, checkpoint_steps, refine_scales_block


def _problem(seed: int, n: int = 8, k: int = 32, g: int = 8, batches: int = 4, rows: int = 16):
    """A one-linear block y = x Wᵀ: FP weight, frozen integer codes, grid scales, batches."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=gen)
    g_idx = torch.arange(k) // g
    grid = (W.abs().reshape(n, k // g, g).amax(-1) / 3).half().float()
    U = torch.round(W / grid[:, g_idx]).clamp(-4, 3)
    # The start is a perturbed grid (what stage 2 hands over), inside the smallest box tested.
    start = (grid * torch.empty_like(grid).uniform_(0.85, 1.15, generator=gen)).half().float()
    xs = [torch.randn(rows, k, generator=gen) for _ in range(batches)]
    return W, U, g_idx, grid, start, xs


def _loss_fn(W, xs):
    def loss(weights, b):
        err = xs[b] @ weights[0].T - xs[b] @ W.T
        return err.square().sum(), err.numel()

    return loss


def _full_loss(W, U, g_idx, scales, xs):
    """The oracle: mean squared output error over every batch, computed directly."""
    Q = scales[:, g_idx] * U
    errs = torch.cat([x @ Q.T - x @ W.T for x in xs])
    return float(errs.square().mean())


@pytest.mark.parametrize("box", [1.25, 2.0, None])
def test_projection_keeps_scales_in_the_box_and_positive(box):
    _, U, g_idx, grid, start, _ = _problem(0)
    start[0, 0] = 0.0  # an fp16 underflow: pinned
    p = LogScales.around(start, grid, U, g_idx, box)
    assert torch.equal(p.scales().detach(), start)  # θ = 0 is the start
    with torch.no_grad():
        p.theta.copy_(torch.randn(p.theta.shape, generator=torch.Generator().manual_seed(1)) * 5)
    p.project_()
    s = p.scales().detach()
    assert s[0, 0] == 0 and bool((s.flatten()[1:] > 0).all())
    if box is not None:
        live, eps = start > 0, 1e-5
        assert bool((s[live] >= grid[live] / box * (1 - eps)).all())
        assert bool((s[live] <= grid[live] * box * (1 + eps)).all())
        # θ of ±5 goes far beyond any edge: the projection is what holds the scales in.
        at_edge = torch.isclose(s, grid / box) | torch.isclose(s, grid * box)
        assert at_edge[live].float().mean() > 0.9
    else:
        assert torch.allclose(s[start > 0].log(), (start * p.theta.exp())[start > 0].log())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lr", [1e-3, 3e-2, 1.0])
def test_refinement_never_ends_above_the_start_and_reports_its_true_loss(seed, lr):
    W, U, g_idx, grid, start, xs = _problem(seed)
    params = [LogScales.around(start, grid, U, g_idx, 2.0 if lr < 1 else None)]
    order = [t % len(xs) for t in range(40)]
    out = refine_scales_block(params, _loss_fn(W, xs), order, len(xs), lr=lr)
    assert out.loss_start == pytest.approx(_full_loss(W, U, g_idx, start, xs), rel=1e-5)
    assert out.loss == pytest.approx(_full_loss(W, U, g_idx, out.scales[0], xs), rel=1e-5)
    assert out.loss <= out.loss_start
    assert torch.equal(out.scales[0], out.scales[0].half().float())  # what the checkpoint stores
    if out.best_step == 0:
        assert torch.equal(out.scales[0], start)
    assert out.steps == 40 and out.best_step in checkpoint_steps(40)


def test_refinement_approaches_the_least_squares_scales():
    """Unboxed, the problem is a least-squares fit of the scales: compare with its solution."""
    W, U, g_idx, grid, start, xs = _problem(2)
    X = torch.cat(xs).double()
    n, n_g = start.shape
    onehot = torch.nn.functional.one_hot(g_idx, n_g).double()  # [K, n_g]
    best = torch.empty(n, n_g, dtype=torch.float64)
    for r in range(n):  # y_r = X w_r = Σ_i s_i X (u_r ∘ 1_i)
        basis = X @ (U[r].double()[:, None] * onehot)
        best[r] = torch.linalg.lstsq(basis, X @ W[r].double()).solution
    assert bool((best > 0).all())  # the optimum is reachable by s = start·exp(θ)
    optimum = _full_loss(W, U, g_idx, best.float(), xs)
    params = [LogScales.around(start, grid, U, g_idx, None)]
    order = [t % len(xs) for t in range(300)]
    out = refine_scales_block(params, _loss_fn(W, xs), order, len(xs), lr=3e-2)
    assert optimum <= out.loss
    assert out.loss - optimum < 0.05 * (out.loss_start - optimum)


@pytest.mark.parametrize(
    ("steps", "expected"), [(1, [0, 1]), (4, [0, 2, 4]), (25, [0, 13, 25]), (100, [0, 50, 100])]
)
def test_checkpoints_include_the_start_and_the_end(steps, expected):
    assert checkpoint_steps(steps) == expected
    assert checkpoint_steps(1000, evals=4) == [0, 250, 500, 750, 1000]
