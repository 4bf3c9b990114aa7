import pytest
import torch


def correlated_inputs(K: int, T: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strong cross-feature correlation and uneven feature scales, like LLM
    activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(K) + 2 * torch.randn(K, K, generator=g) / K**0.5
    X = torch.randn(T, K, generator=g) @ mix
    return X * (0.1 + 2 * torch.rand(K, generator=g))  # [T, K]


@pytest.fixture
def layer():
    """W [96, 256] and H = E[XXᵀ] from correlated inputs."""
    g = torch.Generator().manual_seed(1)
    X = correlated_inputs(256, 2048)
    W = torch.randn(96, 256, generator=g)
    return W, X.t() @ X / X.shape[0]
