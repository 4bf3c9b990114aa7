"""Random GPTQ layers built with the real packer, for the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tsq_vllm.format import dequantize, pack_linear


@dataclass
class Layer:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None  # None: sequential groups (what the fast path takes)
    g_idx_full: torch.Tensor  # always the [K] tensor, as stored in a checkpoint
    bits: int
    fmt: str

    @property
    def args(self):
        return self.qweight, self.qzeros, self.scales, self.g_idx

    def weight(self) -> torch.Tensor:
        """W [K, N] in fp32, from the reference decode."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx_full, self.bits, self.fmt,
                          dtype=torch.float32)


def make_layer(K: int, N: int, bits: int, G: int, *, act_order: bool = False, fmt: str = "gptq",
               seed: int = 0) -> Layer:
    gen = torch.Generator().manual_seed(seed)
    n_g = K // G
    codes = torch.randint(0, 2**bits, (N, K), generator=gen)
    # v1 stores z - 1, so z spans [1, 2**b] (z = 2**b is the largest storable); v2 stores z as is.
    lo, hi = (1, 2**bits + 1) if fmt == "gptq" else (0, 2**bits)
    zeros = torch.randint(lo, hi, (N, n_g), generator=gen)
    scales = (0.5 + torch.rand(N, n_g, generator=gen)) / 2**bits
    if act_order:
        perm = torch.randperm(K, generator=gen)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = (torch.arange(K) // G).to(torch.int32)
    else:
        g_idx = (torch.arange(K) // G).to(torch.int32)
    t = pack_linear(codes, scales, zeros, g_idx, bits, fmt)
    return Layer(t.qweight, t.qzeros, t.scales, t.g_idx if act_order else None, t.g_idx, bits, fmt)


def activations(M: int, K: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check_close(y: torch.Tensor, x: torch.Tensor, layer: Layer) -> None:
    """y against x·W computed in fp32: every element finite, max error within the output dtype's
    rounding plus (for the GEMM) rounding W to the activation dtype."""
    ref = x.float() @ layer.weight()
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all(), f"{(~torch.isfinite(y)).sum().item()} non-finite outputs (unwritten tile?)"
    tol = 2e-3 if x.dtype == torch.float16 else 1.2e-2
    err = (y.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f"max |y - ref| = {err:.3g} > {tol} * {scale:.3g}"
