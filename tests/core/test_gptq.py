import pytest
import torch

from tsq_vllm.core import damp_hessian, gptq_quantize, layer_objective, quantize_codes, search_grid


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
    from tsq_vllm.core import asymmetric_target

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
