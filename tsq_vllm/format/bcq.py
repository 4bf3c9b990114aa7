"""The BCQ tensor layout of one linear layer (LUT-GEMM style), and its torch reference decode.

A k-bit binary-coded weight is Σ_i a_i · b_i + o per (group, output channel), b_i ∈ {−1, +1}.
Per linear with K = in_features, N = out_features, group size G, n_g = K / G:

  bcq_bits    int32 [k, K / 32, N]   bit-plane i, packed along K: bit j (LSB first) of word
                                     [i, w, n] is 1 where b_i = +1 for input column 32 w + j
  bcq_alpha   fp16  [k, n_g, N]      a_i, the scale already folded in (s · α_i)
  bcq_offset  fp16  [n_g, N]         o = s · (c − z)
  g_idx       int32 [K], optional    group of input column k; absent means k // G

  W[k, n] = Σ_i bcq_alpha[i, g, n] · (2 · bit_i[k, n] − 1) + bcq_offset[g, n],   g = g_idx[k]

Planes pack 32 input columns per int32 word with the same little-endian bit order as the GPTQ
qweight stream (`packing.py`) at 1 bit per value; the output dimension stays innermost and
contiguous, as in qweight, so a kernel reads one word per (plane, 32 inputs, output). A GEMV reads
y[n] = Σ_g Σ_i a_i[g, n] · Σ_{k ∈ g} x_k b_i[k, n] + Σ_g o[g, n] Σ_{k ∈ g} x_k; LUT-GEMM
precomputes the 2⁸ signed partial sums of each 8 inputs and indexes them with one byte of a word.

`dequantize_bcq` is the specification: float32 accumulation over the planes in order i = 0..k−1,
offset added last, one rounding to the output dtype. Bits per weight on disk: k + 16 (k + 1) / G.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BCQ_FORMAT",
    "BCQ_TENSOR_NAMES",
    "BCQTensors",
    "check_bcq_shape",
    "dequantize_bcq",
    "pack_bcq",
    "pack_planes",
    "unpack_bcq",
    "unpack_planes",
]

WORD = 32
# The checkpoint_format of a BCQ checkpoint, and the tensors it stores per quantized linear.
BCQ_FORMAT = "bcq"
BCQ_TENSOR_NAMES = ("bcq_bits", "bcq_alpha", "bcq_offset", "g_idx")


def check_bcq_shape(K: int, N: int, group_size: int) -> None:
    """Whether a linear of in_features K can be stored as BCQ with `group_size` (N is free)."""
    if group_size <= 0 or group_size % WORD:
        raise ValueError(f"group_size={group_size} is not a multiple of 32: use 32, 64 or 128")
    if K % group_size:
        raise ValueError(
            f"in_features={K} is not a multiple of group_size={group_size}: pick a group size "
            f"that divides {K}"
        )
    if N < 1:
        raise ValueError(f"out_features={N} must be at least 1")


def _check_k(K: int) -> None:
    if K % WORD:
        raise ValueError(
            f"in_features={K} is not a multiple of {WORD}: BCQ packs 32 inputs per int32 word"
        )


def pack_planes(signs: torch.Tensor) -> torch.Tensor:
    """signs [k, N, K] in {−1, +1} to bcq_bits int32 [k, K / 32, N]."""
    k, N, K = signs.shape
    _check_k(K)
    if not ((signs == 1) | (signs == -1)).all():
        raise ValueError("binary-coding signs must all be -1 or +1")
    bits = (signs > 0).to(torch.int64).transpose(1, 2).reshape(k, K // WORD, WORD, N)
    words = (bits << torch.arange(WORD)[:, None]).sum(2)  # [k, K/32, N], in [0, 2^32)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_planes(bcq_bits: torch.Tensor) -> torch.Tensor:
    """bcq_bits int32 [k, K / 32, N] to signs int8 [k, K, N] in {−1, +1}."""
    if bcq_bits.dtype != torch.int32 or bcq_bits.ndim != 3:
        raise TypeError(
            f"bcq_bits must be int32 [k, K/32, N], got {bcq_bits.dtype} {tuple(bcq_bits.shape)}"
        )
    k, n_words, N = bcq_bits.shape
    w = bcq_bits.to(torch.int64) & 0xFFFFFFFF
    bits = (w[:, :, None, :] >> torch.arange(WORD)[:, None]) & 1  # [k, K/32, 32, N]
    return (bits * 2 - 1).reshape(k, n_words * WORD, N).to(torch.int8)


@dataclass
class BCQTensors:
    """The packed tensors of one linear layer, exactly as stored; shapes checked on construction."""

    bcq_bits: torch.Tensor
    bcq_alpha: torch.Tensor
    bcq_offset: torch.Tensor
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.bcq_bits.dtype != torch.int32 or self.bcq_bits.ndim != 3:
            raise ValueError(
                f"bcq_bits must be int32 [k, K/32, N], got {self.bcq_bits.dtype} "
                f"{tuple(self.bcq_bits.shape)}"
            )
        k, n_words, N = self.bcq_bits.shape
        K = n_words * WORD
        if (
            not self.bcq_alpha.dtype.is_floating_point
            or self.bcq_alpha.ndim != 3
            or self.bcq_alpha.shape[::2] != (k, N)
        ):
            raise ValueError(
                f"bcq_alpha must be float [k={k}, n_g, N={N}], got {self.bcq_alpha.dtype} "
                f"{tuple(self.bcq_alpha.shape)}"
            )
        n_g = self.bcq_alpha.shape[1]
        if self.bcq_offset.shape != (n_g, N) or self.bcq_offset.dtype != self.bcq_alpha.dtype:
            raise ValueError(
                f"bcq_offset must be {self.bcq_alpha.dtype} [n_g={n_g}, N={N}], got "
                f"{self.bcq_offset.dtype} {tuple(self.bcq_offset.shape)}"
            )
        if self.g_idx is None:
            if n_g == 0 or K % n_g:
                raise ValueError(f"without g_idx, n_g={n_g} groups must divide in_features={K}")
        elif self.g_idx.dtype != torch.int32 or self.g_idx.shape != (K,):
            raise ValueError(
                f"g_idx must be int32 [K={K}], got {self.g_idx.dtype} {tuple(self.g_idx.shape)}"
            )
        self.check_values()

    def check_values(self, where: str = "") -> None:
        """The values a loader must not serve, as one line naming `where` (the layer): finite
        coefficients and g_idx entries that name a group."""
        name = f"{where}." if where else ""
        for t_name in ("bcq_alpha", "bcq_offset"):
            t = getattr(self, t_name)
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(
                    f"{name}{t_name} has {bad} NaN/inf value(s) of {t.numel()}: non-finite "
                    "coefficients give garbage outputs; re-quantize or re-download the checkpoint"
                )
        g, n_g = self.g_idx, self.n_groups
        if g is not None and g.numel() and (int(g.min()) < 0 or int(g.max()) >= n_g):
            raise ValueError(
                f"{name}g_idx must be int32 [K] with values in [0, {n_g}) (the groups of "
                f"coefficients) but spans [{int(g.min())}, {int(g.max())}]: the checkpoint's "
                "g_idx does not belong to these coefficients"
            )

    @property
    def bits(self) -> int:
        return self.bcq_bits.shape[0]

    @property
    def K(self) -> int:
        """in_features."""
        return self.bcq_bits.shape[1] * WORD

    @property
    def N(self) -> int:
        """out_features."""
        return self.bcq_bits.shape[2]

    @property
    def n_groups(self) -> int:
        return self.bcq_alpha.shape[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [K, N] by the reference decode `dequantize_bcq`."""
        return dequantize_bcq(self.bcq_bits, self.bcq_alpha, self.bcq_offset, self.g_idx, dtype)

    def group_index(self) -> torch.Tensor:
        """The group of every input column [K] (int64)."""
        K = self.bcq_bits.shape[1] * WORD
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(K) // (K // self.bcq_alpha.shape[1])

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The checkpoint entries `<prefix>.bcq_bits`, ... (g_idx only when stored)."""
        names = ("bcq_bits", "bcq_alpha", "bcq_offset") + (
            ("g_idx",) if self.g_idx is not None else ()
        )
        return {f"{prefix}.{n}": getattr(self, n).contiguous() for n in names}


def pack_bcq(
    signs: torch.Tensor,
    alpha: torch.Tensor,
    offset: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
) -> BCQTensors:
    """Pack one layer given in `nn.Linear` orientation.

    signs [k, N, K] in {−1, +1}, alpha [N, n_g, k] (s · α_i), offset [N, n_g] (s · (c − z)),
    g_idx [K] or None for contiguous groups. Values that overflow `dtype` are refused.
    """
    k, N, _ = signs.shape
    if alpha.shape[0] != N or alpha.shape[2:] != (k,) or offset.shape != alpha.shape[:2]:
        raise ValueError(
            f"alpha {tuple(alpha.shape)} and offset {tuple(offset.shape)} must be [N={N}, n_g, "
            f"k={k}] and [N={N}, n_g]"
        )
    return BCQTensors(
        bcq_bits=pack_planes(signs),
        bcq_alpha=alpha.permute(2, 1, 0).to(dtype).contiguous(),  # [k, n_g, N]
        bcq_offset=offset.t().to(dtype).contiguous(),  # [n_g, N]
        g_idx=None if g_idx is None else g_idx.to(torch.int32).contiguous(),
    )


def unpack_bcq(t: BCQTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_bcq`: signs int8 [k, N, K], alpha float32 [N, n_g, k], offset float32 [N,
    n_g]."""
    return (
        unpack_planes(t.bcq_bits).transpose(1, 2).contiguous(),
        t.bcq_alpha.float().permute(2, 1, 0).contiguous(),
        t.bcq_offset.float().t().contiguous(),
    )


def dequantize_bcq(
    bcq_bits: torch.Tensor,
    bcq_alpha: torch.Tensor,
    bcq_offset: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The reference decode: W [K, N] = Σ_i bcq_alpha[i, g] · b_i + bcq_offset[g], in `dtype`."""
    t = BCQTensors(bcq_bits, bcq_alpha, bcq_offset, g_idx)
    g = t.group_index()
    signs = unpack_planes(bcq_bits).float()  # [k, K, N]
    alpha = bcq_alpha.float()[:, g]  # [k, K, N]
    w = torch.zeros(signs.shape[1:], dtype=torch.float32)
    for i in range(t.bits):  # plane order fixed: the spec's accumulation order
        w += alpha[i] * signs[i]
    w += bcq_offset.float()[g]
    return w.to(dtype or bcq_alpha.dtype)
