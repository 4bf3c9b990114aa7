"""Random GPTQ layers built with the real packer, for the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tsq_vllm.format import GPTQLayer, pack_linear


@dataclass
class Layer:
    stored: GPTQLayer  # as a checkpoint stores it: g_idx always the [K] tensor
    gptq: GPTQLayer  # what kernels take: g_idx None for sequential groups (the fast path)

    @property
    def bits(self) -> int:
        return self.stored.bits

    @property
    def fmt(self) -> str:
        return self.stored.checkpoint_format

    @property
    def g_idx(self) -> torch.Tensor | None:
        return self.gptq.g_idx

    def on(self, device: str) -> GPTQLayer:
        g = self.gptq
        return replace(
            g,
            qweight=g.qweight.to(device),
            qzeros=g.qzeros.to(device),
            scales=g.scales.to(device),
            g_idx=None if g.g_idx is None else g.g_idx.to(device),
        )

    def weight(self) -> torch.Tensor:
        """W [K, N] in fp32, from the reference decode."""
        return self.stored.dequantize(dtype=torch.float32)


def make_layer(
    K: int, N: int, bits: int, G: int, *, act_order: bool = False, fmt: str = "gptq", seed: int = 0
) -> Layer:
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
    return Layer(t, t if act_order else replace(t, g_idx=None))


def activations(M: int, K: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check_close(y: torch.Tensor, x: torch.Tensor, layer: Layer) -> None:
    """y against x·W computed in fp32: every element finite, max error within the output dtype's
    rounding plus (for the GEMM) rounding W to the activation dtype."""
    ref = x.float() @ layer.weight()
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all(), (
        f"{(~torch.isfinite(y)).sum().item()} non-finite outputs (unwritten tile?)"
    )
    tol = 2e-3 if x.dtype == torch.float16 else 1.2e-2
    err = (y.float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f"max |y - ref| = {err:.3g} > {tol} * {scale:.3g}"
