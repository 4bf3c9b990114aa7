"""The GPTQ tensor layout of one quantized linear layer, and its torch reference dequantization.

Per linear with K = in_features, N = out_features, group size G, n_g = K / G:

  qweight  int32 [K * b / 32, N]   codes packed along K
  qzeros   int32 [n_g, N * b / 32] zero points packed along N; "gptq" (v1) stores z - 1,
                                   "gptq_v2" stores z
  scales   fp16  [n_g, N]
  g_idx    int32 [K]               group of input column k (k // G without act-order)

  W[k, n] = scales[g_idx[k], n] * (code[k, n] - z[g_idx[k], n])

`dequantize` is the specification every kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import check_bits, pack, unpack

__all__ = ["CHECKPOINT_FORMATS", "GPTQTensors", "check_tensors", "pack_linear", "unpack_linear", "dequantize"]

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _zero_offset(checkpoint_format: str) -> int:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format={checkpoint_format!r} is not supported: use one of {CHECKPOINT_FORMATS}"
        )
    return 1 if checkpoint_format == "gptq" else 0


@dataclass
class GPTQTensors:
    """The packed tensors of one linear layer, exactly as stored in the checkpoint."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor

    def as_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": getattr(self, k) for k in ("qweight", "qzeros", "scales", "g_idx")}


_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensors(
    t: GPTQTensors,
    bits: int,
    group_size: int,
    checkpoint_format: str,
    where: str,
    *,
    in_features: int | None = None,
    out_features: int | None = None,
) -> None:
    """Raise a one-line ValueError unless `t` is a loadable layer: dtypes, shapes, finite scales,
    zero points in [0, 2**bits) after the format's offset, g_idx inside the groups.

    Shapes are checked against each other, and against `in_features`/`out_features` (with
    K / group_size groups) when given; without them the group count is taken from `scales`
    (a tensor-parallel shard may hold every group of the layer).
    """
    check_bits(bits)
    offset = _zero_offset(checkpoint_format)
    fix = "re-quantize or re-download the checkpoint"
    for name, dtypes in (("qweight", (torch.int32,)), ("qzeros", (torch.int32,)), ("scales", _SCALE_DTYPES),
                         ("g_idx", (torch.int32, torch.int64))):
        got = getattr(t, name)
        if got.dtype not in dtypes:
            raise ValueError(f"corrupt checkpoint: {where}.{name} has dtype {got.dtype}, expected "
                             f"{' or '.join(str(d) for d in dtypes)}: {fix}")
    k = int(t.g_idx.numel()) if in_features is None else in_features
    n = int(t.scales.shape[-1]) if out_features is None else out_features
    if (in_features is not None and k % group_size) or (k * bits) % 32 or (n * bits) % 32:
        raise ValueError(f"corrupt checkpoint: {where} shape [{n}, {k}] cannot hold {bits}-bit group "
                         f"{group_size} tensors: {fix}")
    n_g = k // group_size if in_features is not None else int(t.scales.shape[0]) if t.scales.ndim == 2 else -1
    expected = {"qweight": (k * bits // 32, n), "qzeros": (n_g, n * bits // 32), "scales": (n_g, n), "g_idx": (k,)}
    for name, shape in expected.items():
        got = getattr(t, name)
        if tuple(got.shape) != shape:
            raise ValueError(
                f"corrupt checkpoint: {where}.{name} is {got.dtype} {list(got.shape)}, expected {list(shape)} "
                f"for a {bits}-bit, group {group_size} layer with in_features={k}, out_features={n}; "
                f"re-quantize or fix the config"
            )
    bad = int((~torch.isfinite(t.scales)).sum())
    if bad:
        raise ValueError(f"corrupt checkpoint: {where}.scales has {bad} NaN/inf value(s) of {t.scales.numel()}: "
                         f"non-finite scales give garbage outputs; {fix}")
    if t.qzeros.numel():
        z = unpack(t.qzeros, bits, dim=1) + offset
        lo, hi = int(z.min()), int(z.max())
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(
                f"corrupt checkpoint: {where}.qzeros decodes to zero points in [{lo}, {hi}] with "
                f"checkpoint_format={checkpoint_format!r}, outside [0, {(1 << bits) - 1}] for {bits} bits: "
                f"the checkpoint_format in the config is wrong or the file is corrupt; {fix}"
            )
    if t.g_idx.numel() and (int(t.g_idx.min()) < 0 or int(t.g_idx.max()) >= n_g):
        raise ValueError(f"corrupt checkpoint: {where}.g_idx has groups outside [0, {n_g}): {fix}")


def pack_linear(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> GPTQTensors:
    """Pack one layer given in `nn.Linear` orientation.

    codes [N, K] integers in [0, 2**bits), scales [N, n_g], zeros [N, n_g] integers, g_idx [K].
    """
    check_bits(bits)
    offset = _zero_offset(checkpoint_format)
    n_out, k_in = codes.shape
    if scales.shape != zeros.shape or scales.shape[0] != n_out:
        raise ValueError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be [N={n_out}, n_g]")
    if g_idx.shape != (k_in,):
        raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected [K={k_in}]")
    z = zeros.to(torch.int64) - offset
    if z.numel() and int(z.min()) < 0:
        raise ValueError(
            f"a zero point of {int(zeros.min())} cannot be stored in checkpoint_format "
            f"{checkpoint_format!r} (it stores z - 1): quantize with z >= 1 or write 'gptq_v2'"
        )
    return GPTQTensors(
        qweight=pack(codes.t(), bits, dim=0),  # [K*b/32, N]
        qzeros=pack(z.t(), bits, dim=1),  # [n_g, N*b/32]
        scales=scales.t().to(torch.float16).contiguous(),  # [n_g, N]
        g_idx=g_idx.to(torch.int32).contiguous(),
    )


def unpack_linear(
    t: GPTQTensors, bits: int, checkpoint_format: str = "gptq"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [K, N] and zero points [n_g, N] (true z, not z - 1), both int32."""
    offset = _zero_offset(checkpoint_format)
    codes = unpack(t.qweight, bits, dim=0)
    zeros = unpack(t.qzeros, bits, dim=1) + offset
    return codes, zeros


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The reference decode: W [K, N] = scales[g_idx] * (codes - zeros[g_idx]), in `dtype`."""
    codes, zeros = unpack_linear(GPTQTensors(qweight, qzeros, scales, g_idx), bits, checkpoint_format)
    g = g_idx.long()
    w = scales.float()[g] * (codes - zeros[g]).float()  # [K, N]
    return w.to(dtype or scales.dtype)
