"""The GPTQ tensor layout of one quantized linear layer, and its torch reference dequantization.

Per linear with K = in_features, N = out_features, group size G, n_groups = K / G:

  qweight  int32 [K * b / 32, N]        codes packed along K
  qzeros   int32 [n_groups, N * b / 32] zero points packed along N; "gptq" (v1) stores z - 1,
                                        "gptq_v2" stores z
  scales   fp16  [n_groups, N]
  g_idx    int32 [K]                    group of input column k (k // G without act-order)

  W[k, n] = scales[g_idx[k], n] * (code[k, n] - z[g_idx[k], n])

`GPTQLayer` holds these tensors with bits, group size and format, and `GPTQLayer.validate` is
the one place that says which tensors form a layer. `GPTQLayer.dequantize` is the specification
every kernel is tested against. The bit layout of the packed words is in `packing` and
docs/format.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .packing import check_bits, pack, run_length, unpack

__all__ = [
    "CHECKPOINT_FORMATS",
    "GPTQLayer",
    "TENSOR_NAMES",
    "check_linear_shape",
    "pack_linear",
    "packed_shapes",
    "zero_offset",
]

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
# The tensors a checkpoint stores per quantized linear, `<prefix>.<name>`.
TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def zero_offset(checkpoint_format: str) -> int:
    """What to add to a stored zero point to get z: 1 for GPTQ v1 (stores z - 1), 0 for v2."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format={checkpoint_format!r} is not supported: use one of "
            f"{CHECKPOINT_FORMATS}"
        )
    return 1 if checkpoint_format == "gptq" else 0


def packed_shapes(K: int, N: int, bits: int, n_groups: int) -> dict[str, tuple[int, ...]]:
    """The stored shape of each tensor of a layer with K inputs, N outputs and n_groups groups."""
    return {
        "qweight": (K * bits // 32, N),
        "qzeros": (n_groups, N * bits // 32),
        "scales": (n_groups, N),
        "g_idx": (K,),
    }


def check_linear_shape(K: int, N: int, bits: int, group_size: int) -> None:
    """Whether a linear of in_features K and out_features N can be stored at `bits`, `group_size`.

    The one statement of the layout's size rules: groups of a multiple of 32 columns (whole
    packing runs for every width, and the kernels' K tile) that split K, and N a whole number of
    packing runs because qzeros packs along N. Callers add where the sizes came from.
    """
    check_bits(bits)
    if group_size <= 0 or group_size % 32:
        raise ValueError(f"group_size={group_size} is not a multiple of 32: use 32, 64 or 128")
    if K % group_size:
        raise ValueError(
            f"in_features={K} is not a multiple of group_size={group_size}: pick a group size "
            f"that divides {K}"
        )
    run = run_length(bits)
    if N % run:
        raise ValueError(
            f"out_features={N} is not a multiple of {run}, which {bits}-bit GPTQ packing needs "
            f"({run} codes fill whole int32 words): use another bits setting"
        )


@dataclass(frozen=True, eq=False)  # eq on tensors would compare elementwise: identity instead
class GPTQLayer:
    """The packed tensors of one linear layer, exactly as stored, with what it takes to read them.

    `g_idx` None means the sequential order k // group_size (kernels then skip the per-row
    gather); a stored g_idx that is sequential can be dropped once at load with
    `drop_sequential_g_idx`. Shapes, dtypes and devices are checked on construction; the value
    check of g_idx (`check_g_idx`) synchronizes on CUDA, so it is called once at load time.
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    checkpoint_format: str = "gptq"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def K(self) -> int:
        """in_features."""
        return self.qweight.shape[0] * 32 // self.bits

    @property
    def N(self) -> int:
        """out_features."""
        return self.qweight.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def zero_offset(self) -> int:
        return zero_offset(self.checkpoint_format)

    def validate(self) -> None:
        """Raise TypeError (dtype) or ValueError (shape, device) naming the first bad tensor."""
        bits, G = self.bits, self.group_size
        check_bits(bits)
        zero_offset(self.checkpoint_format)
        for name, t in (("qweight", self.qweight), ("qzeros", self.qzeros)):
            if t.dtype != torch.int32:
                raise TypeError(
                    f"{name} has dtype {t.dtype}: GPTQ packs codes into int32 words; load it as "
                    "int32"
                )
            if t.dim() != 2:
                raise ValueError(f"{name} has shape {tuple(t.shape)}: expected a 2-D packed tensor")
        if self.scales.dtype not in _SCALE_DTYPES or self.scales.dim() != 2:
            raise TypeError(
                f"scales has dtype {self.scales.dtype}, shape {tuple(self.scales.shape)}: "
                "expected fp16 [K/G, N]"
            )
        rows, N = self.qweight.shape
        if (rows * 32) % bits:
            raise ValueError(
                f"qweight has shape {tuple(self.qweight.shape)}: {bits}-bit codes need "
                f"[K*{bits}/32, N] rows for a whole K; check bits"
            )
        K = self.K
        try:
            check_linear_shape(K, N, bits, G)
        except ValueError as e:
            raise ValueError(
                f"qweight has shape {tuple(self.qweight.shape)} (K={K}, N={N} at {bits} bits): {e}"
            ) from None
        n_groups = self.n_groups
        if self.scales.shape[1] != N:
            raise ValueError(
                f"scales has shape {tuple(self.scales.shape)}: expected [K/G, N] with N={N} "
                "(qweight.shape[1])"
            )
        # With a g_idx every column names its group, so a row-parallel shard may hold the
        # groups of the whole layer; without one the groups are exactly the K / G blocks.
        if n_groups < K // G or (self.g_idx is None and n_groups != K // G):
            raise ValueError(
                f"scales has {n_groups} groups for K={K}: expected K / group_size = {K // G} "
                f"groups of {G}; re-quantize, or check group_size"
            )
        shapes = packed_shapes(K, N, bits, n_groups)
        if tuple(self.qzeros.shape) != shapes["qzeros"]:
            raise ValueError(
                f"qzeros has shape {tuple(self.qzeros.shape)}: expected [K/G, N*bits/32] = "
                f"{list(shapes['qzeros'])} for bits={bits}; check bits and group size"
            )
        tensors = [("qzeros", self.qzeros), ("scales", self.scales)]
        if self.g_idx is not None:
            if self.g_idx.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"g_idx has dtype {self.g_idx.dtype}: expected int32 (or int64)")
            if tuple(self.g_idx.shape) != shapes["g_idx"]:
                raise ValueError(f"g_idx has shape {tuple(self.g_idx.shape)}: expected [K] = [{K}]")
            tensors.append(("g_idx", self.g_idx))
        for name, t in tensors:
            if t.device != self.qweight.device:
                raise ValueError(
                    f"{name} is on {t.device} but qweight is on {self.qweight.device}: keep a "
                    "layer's tensors on one device"
                )

    def check_g_idx(self, where: str = "") -> None:
        """Every g_idx entry names a row of scales (reads the values: call once, at load).

        `where` (the layer's name) leads the message when given.
        """
        g = self.g_idx
        if g is not None and g.numel() and (int(g.min()) < 0 or int(g.max()) >= self.n_groups):
            raise ValueError(
                f"{where + '.' if where else ''}g_idx spans [{int(g.min())}, {int(g.max())}] but "
                f"there are {self.n_groups} groups of scales: the checkpoint's g_idx does not "
                "belong to these scales"
            )

    def check_values(self, where: str) -> None:
        """The values a loader must not serve, as one line naming `where` (the layer): finite
        scales, zero points in [0, 2**bits) after the format's offset, and g_idx (`check_g_idx`).

        Shapes and dtypes hold by construction; this reads every value (and synchronizes on
        CUDA), so it runs once: at load, and in the quantizer before writing.
        """
        fix = "re-quantize or re-download the checkpoint"
        bad = int((~torch.isfinite(self.scales)).sum())
        if bad:
            raise ValueError(
                f"{where}.scales has {bad} NaN/inf value(s) of {self.scales.numel()}: non-finite "
                f"scales give garbage outputs; {fix}"
            )
        if self.qzeros.numel():
            z = self.unpack_zeros()
            lo, hi = int(z.min()), int(z.max())
            if lo < 0 or hi >= 1 << self.bits:
                raise ValueError(
                    f"{where}.qzeros decodes to zero points in [{lo}, {hi}] with "
                    f"checkpoint_format={self.checkpoint_format!r}, outside [0, "
                    f"{(1 << self.bits) - 1}] for {self.bits} bits: the checkpoint_format in the "
                    f"config is wrong or the file is corrupt; {fix}"
                )
        self.check_g_idx(where)

    def sequential_g_idx(self) -> torch.Tensor:
        """k // group_size as int32 [K] on the layer's device: the order without act-order."""
        return (
            torch.arange(self.K, device=self.qweight.device, dtype=torch.int32) // self.group_size
        )

    @property
    def full_g_idx(self) -> torch.Tensor:
        """g_idx as a [K] tensor, also when it is None (sequential)."""
        return self.sequential_g_idx() if self.g_idx is None else self.g_idx

    @property
    def is_sequential(self) -> bool:
        """True when g_idx is k // G (no act-order). Reads the values: on CUDA it synchronizes."""
        return self.g_idx is None or bool(
            torch.equal(self.g_idx.long(), self.sequential_g_idx().long())
        )

    def drop_sequential_g_idx(self) -> GPTQLayer:
        """This layer with g_idx None when it is sequential, so kernels take the faster path."""
        return replace(self, g_idx=None) if self.g_idx is not None and self.is_sequential else self

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes [K, N] and zero points [n_groups, N] (true z, not z - 1), both int32."""
        return unpack(self.qweight, self.bits, dim=0), self.unpack_zeros()

    def unpack_zeros(self) -> torch.Tensor:
        """Zero points [n_groups, N] (true z, not z - 1), int32."""
        return unpack(self.qzeros, self.bits, dim=1) + self.zero_offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reference decode: W [K, N] = scales[g_idx] * (codes - zeros[g_idx]), in `dtype`."""
        codes, zeros = self.unpack()
        g = self.full_g_idx.long()
        w = self.scales.float()[g] * (codes - zeros[g]).float()  # [K, N]
        return w.to(dtype or self.scales.dtype)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The checkpoint entries `<prefix>.qweight`, ... (g_idx always stored)."""
        values = (self.qweight, self.qzeros, self.scales, self.full_g_idx)
        return {f"{prefix}.{name}": t for name, t in zip(TENSOR_NAMES, values, strict=True)}


def pack_linear(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
    *,
    group_size: int | None = None,
) -> GPTQLayer:
    """Pack one layer given in `nn.Linear` orientation.

    codes [N, K] integers in [0, 2**bits), scales [N, n_groups], zeros [N, n_groups] integers,
    g_idx [K]; group_size defaults to K / n_groups.
    """
    check_bits(bits)
    offset = zero_offset(checkpoint_format)
    N, K = codes.shape
    if scales.shape != zeros.shape or scales.shape[0] != N:
        raise ValueError(
            f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be [N={N}, "
            "n_groups]"
        )
    z = zeros.to(torch.int64) - offset
    if z.numel() and int(z.min()) < 0:
        raise ValueError(
            f"a zero point of {int(zeros.min())} cannot be stored in checkpoint_format "
            f"{checkpoint_format!r} (it stores z - 1): quantize with z >= 1 or write 'gptq_v2'"
        )
    n_groups = max(scales.shape[1], 1)
    return GPTQLayer(
        qweight=pack(codes.t(), bits, dim=0),  # [K*b/32, N]
        qzeros=pack(z.t(), bits, dim=1),  # [n_groups, N*b/32]
        scales=scales.t().to(torch.float16).contiguous(),  # [n_groups, N]
        g_idx=g_idx.to(torch.int32).contiguous(),
        bits=bits,
        group_size=group_size if group_size is not None else K // n_groups,
        checkpoint_format=checkpoint_format,
    )
