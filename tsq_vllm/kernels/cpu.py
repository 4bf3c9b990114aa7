"""CPU fast path for GPTQ-packed linears: repack once at load, then a native int4 matmul per call.

Dequantizing the packed codes on every call in eager torch costs 10-60x a dense matmul, so the
serving path converts each layer once (`prepare_cpu_linear`) into one of three forms:

  "int4"    bits 2/3/4 with bf16 activations. Codes (< 16) sit in the 4-bit lanes of aten's CPU
            int4 pack (`_convert_weight_to_int4pack_for_cpu`); `_weight_int4pack_mm_for_cpu`
            decodes w = (q - 8)·s + zero per group, so zero = s·(8 - z) reproduces s·(q - z)
            exactly; only s and zero are rounded to bf16, like the activations.
  "native"  bits 2/3/4 with bf16 activations on AVX512-BF16 CPUs: this package's own kernel
            (`kernels.cpu_native`), which decodes each weight tile once for the whole batch;
            scales and zeros stay fp32. The serving chooser (`kernels.backends`) prefers it.
  "int4x2"  bits 8 with bf16 activations: code = 16·hi + lo, two int4 planes summed in fp32,
            16s·(hi - 8) + s·(lo - 8) + s·(136 - z) = s·(code - z). One byte per weight, like int8.
  "dense"   fp16/fp32 activations (aten's int4 kernel runs 10-40x slower than a dense matmul at
            those dtypes, measured in docs/serving.md) and act-order layouts whose columns do not
            regroup into whole blocks of `group_size` columns: the weight is dequantized once with
            the reference decode and served by a dense matmul, exact in fp32.

Act-order (a `g_idx` that is not k // G) is handled by sorting the input columns by group once at
load; each call gathers x's columns in that order (M·K element copies, negligible next to the
matmul). Every path is tested against `GPTQLayer.dequantize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..format.gptq import GPTQLayer
from ..format.packing import check_bits
from .cpu_native import (
    NativeInt4Weights,
    NativePlaneWeights,
    native_mm,
    native_unavailable_reason,
    pack_native,
)

__all__ = [
    "CPU_PATHS",
    "CPUQuantizedLinear",
    "block_layout",
    "group_blocks",
    "int4_kernel_available",
    "native_refusal",
    "prepare_cpu_linear",
    "select_cpu_path",
]

CPU_PATHS = ("int4", "int4x2", "native", "dense")

# Block sizes aten's CPU int4 kernel accepts for its per-group scales.
_INT4_GROUP_SIZES = (32, 64, 128, 256)
# aten packs output channels in blocks of 16; other N are padded with zero columns.
_INT4_N_ALIGN = 16


def int4_kernel_available() -> bool:
    """Whether this torch build has the CPU int4 weight-only matmul (torch >= 2.5)."""
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        aten, "_convert_weight_to_int4pack_for_cpu"
    )


def select_cpu_path(bits: int, act_dtype: torch.dtype) -> str:
    """The path `prepare_cpu_linear` takes for a layer whose groups are contiguous blocks.

    Only bf16 activations go through the int4 kernel: at fp16/fp32 it is slower than a dense
    matmul (docs/serving.md), so those dtypes decode once into a dense weight.
    """
    check_bits(bits)
    if act_dtype != torch.bfloat16 or not int4_kernel_available():
        return "dense"
    return "int4" if bits <= 4 else "int4x2"


@dataclass
class CPUQuantizedLinear:
    """One linear layer prepared for CPU: y = x · W (+ bias), W [K, N] as the reference decodes it.

    path "int4"/"int4x2": `planes` holds 1 or 2 aten int4-packed weights [N_pad, K/2] (uint8),
    `scale_zeros` the matching [K/group_size, N_pad, 2] tables in bf16, `perm` the input-column
    order (None when g_idx is k // G). path "native": `native` holds the kernel's layout (and
    `perm` as above). path "dense": `weight` is W.T [N, K] in the activation dtype.
    """

    path: str
    in_features: int
    out_features: int
    act_dtype: torch.dtype
    group_size: int
    perm: torch.Tensor | None = None
    planes: tuple[torch.Tensor, ...] = ()
    scale_zeros: tuple[torch.Tensor, ...] = ()
    weight: torch.Tensor | None = None
    native: NativeInt4Weights | NativePlaneWeights | None = None

    def nbytes(self) -> int:
        """Bytes held by the prepared tensors (what serving keeps resident)."""
        tensors = [*self.planes, *self.scale_zeros, self.perm, self.weight]
        held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return held + (self.native.nbytes() if self.native is not None else 0)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # Decoding calls this ~100 times per token with M = 1: every no-op dispatch skipped here
        # (reshape of a 2-D x, same-dtype casts, an unpadded slice) is time a step keeps.
        two_d = x.dim() == 2 and x.shape[1] == self.in_features
        x2 = x if two_d else _as_rows(x, self.in_features)  # _as_rows: the shape error
        if self.path == "dense":
            assert self.weight is not None
            w = self.weight
            y = F.linear(x2 if x2.dtype == w.dtype else x2.to(w.dtype), w)
        else:
            y = self._int4(x2)
        if bias is not None:
            y = y + (bias if bias.dtype == y.dtype else bias.to(y.dtype))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if two_d else y.reshape(*x.shape[:-1], self.out_features)

    def _int4(self, x2: torch.Tensor) -> torch.Tensor:
        xa = x2 if x2.dtype == self.act_dtype else x2.to(self.act_dtype)
        # The aten kernel requires a contiguous A; index_select returns one.
        if self.perm is not None:
            xa = xa.index_select(1, self.perm)
        elif not xa.is_contiguous():
            xa = xa.contiguous()
        if xa.shape[0] == 0:
            return xa.new_zeros(0, self.out_features)
        if self.native is not None:
            return native_mm(xa, self.native)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        if len(self.planes) == 1:
            y = mm(xa, self.planes[0], self.group_size, self.scale_zeros[0])
        else:
            # Two nibble planes of an 8-bit code: add in fp32 so the sum is rounded once.
            y = mm(xa, self.planes[0], self.group_size, self.scale_zeros[0]).float()
            y += mm(xa, self.planes[1], self.group_size, self.scale_zeros[1]).float()
        if y.shape[1] != self.out_features:  # drop the N padding
            y = y[:, : self.out_features]
        return y


def native_refusal(act_dtype: torch.dtype, group_size: int) -> str | None:
    """Why the "native" path cannot hold a layer with these activations and groups here, or
    None. The static checks come first, so an fp16 layer never triggers the kernel's build."""
    if act_dtype != torch.bfloat16:
        return f"activation dtype {act_dtype}: the kernel takes bf16 activations"
    if group_size % 2:
        return f"group_size={group_size} is odd: the kernel pairs columns"
    return native_unavailable_reason()


def _as_rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [..., in_features] as rows [M, in_features] (the input check of every CPU layer)."""
    if x.shape[-1] != in_features:
        raise ValueError(
            f"input has {x.shape[-1]} features but this layer takes in_features="
            f"{in_features}: pass x of shape [..., {in_features}]"
        )
    return x.reshape(-1, in_features)


def block_layout(
    g_idx: torch.Tensor, group_size: int
) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """Regroup the K columns into blocks of `group_size` columns that share one group, for the
    aten int4 kernel (None where it does not take `group_size`); see `group_blocks`."""
    if group_size not in _INT4_GROUP_SIZES or g_idx.numel() % group_size:
        return None
    return group_blocks(g_idx, group_size)


def group_blocks(
    g_idx: torch.Tensor, group_size: int
) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """(perm, block_group): perm is the column order that makes every group whole blocks of
    `group_size` columns (None if the identity), block_group[j] the group whose scales serve
    block j; None when no such layout exists (a group whose column count is not a multiple of
    group_size). K must be a multiple of group_size.
    """
    K = g_idx.numel()
    g = g_idx.long()
    order = torch.argsort(g, stable=True)
    blocks = g[order].view(-1, group_size)
    if not bool((blocks == blocks[:, :1]).all()):
        return None
    perm = None if torch.equal(order, torch.arange(K)) else order
    return perm, blocks[:, 0].contiguous()


def _int4_plane(codes_nk: torch.Tensor) -> torch.Tensor:
    """aten's CPU int4 pack of codes [N_pad, K] in [0, 16)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes_nk.to(torch.int32).contiguous(), 1
    )


def prepare_cpu_linear(
    layer: GPTQLayer,
    *,
    act_dtype: torch.dtype = torch.bfloat16,
    path: str | None = None,
) -> CPUQuantizedLinear:
    """Convert one layer's GPTQ tensors (checkpoint layout) into a `CPUQuantizedLinear`.

    `path` forces "dense" (any layer) or an int4 path; by default `select_cpu_path` decides, and
    layers the int4 kernel cannot express fall back to "dense".
    """
    if path is not None and path not in CPU_PATHS:
        raise ValueError(f"path={path!r} is not a CPU path: use one of {CPU_PATHS} or None")
    if act_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"act_dtype={act_dtype} is not supported: use float16, bfloat16 or float32"
        )
    layer.check_g_idx()
    bits, group_size = layer.bits, layer.group_size
    K, N = layer.K, layer.N

    chosen = path or select_cpu_path(bits, act_dtype)
    if chosen != "dense" and (bits == 8) != (chosen == "int4x2"):
        raise ValueError(
            f"path={chosen!r} cannot hold {bits}-bit codes: use 'int4' or 'native' for bits <= 4, "
            "'int4x2' for 8"
        )
    layout = None
    if chosen == "native":
        reason = native_refusal(act_dtype, group_size)
        if reason is not None:
            raise ValueError(
                f"path='native' cannot serve this layer: {reason}; use 'int4' or 'dense'"
            )
        layout = group_blocks(layer.full_g_idx, group_size)
    elif chosen != "dense":
        layout = block_layout(layer.full_g_idx, group_size)
    if layout is None:
        # The reference decode, once; W.T [N, K] is the layout F.linear reads fastest.
        w = layer.dequantize(dtype=torch.float32)
        return CPUQuantizedLinear(
            path="dense",
            in_features=K,
            out_features=N,
            act_dtype=act_dtype,
            group_size=group_size,
            weight=w.t().contiguous().to(act_dtype),
        )

    perm, block_group = layout
    codes, zeros = layer.unpack()
    if perm is not None:
        codes = codes.index_select(0, perm)
    if chosen == "native":
        s_b = layer.scales.float().index_select(0, block_group)  # [K/G, N]
        z_b = zeros.float().index_select(0, block_group)
        return CPUQuantizedLinear(
            path="native",
            in_features=K,
            out_features=N,
            act_dtype=act_dtype,
            group_size=group_size,
            perm=perm,
            native=pack_native(codes, s_b, -s_b * z_b, group_size),
        )
    n_pad = -N % _INT4_N_ALIGN
    s = F.pad(layer.scales.float().index_select(0, block_group), (0, n_pad))  # [K/G, N_pad]
    z = F.pad(zeros.float().index_select(0, block_group), (0, n_pad))
    codes_nk = F.pad(codes.t(), (0, 0, 0, n_pad))  # [N_pad, K]; padded columns decode to 0

    def table(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return torch.stack([scale, zero], dim=-1).to(act_dtype).contiguous()

    planes: tuple[torch.Tensor, ...]
    tables: tuple[torch.Tensor, ...]
    if chosen == "int4" and bits <= 3:
        # c - z + 8 lies in [0, 15] for 2/3-bit codes, so the zero point moves into the codes and
        # the table's zero term is exactly 0: only s is rounded to bf16.
        z_k = z.repeat_interleave(group_size, dim=0).t()  # [N_pad, K]
        planes = (_int4_plane(codes_nk - z_k.to(torch.int32) + 8),)
        tables = (table(s, torch.zeros_like(s)),)
    elif chosen == "int4":
        planes = (_int4_plane(codes_nk),)
        tables = (table(s, s * (8 - z)),)
    else:
        planes = (_int4_plane(codes_nk >> 4), _int4_plane(codes_nk & 15))
        tables = (table(16 * s, s * (136 - z)), table(s, torch.zeros_like(s)))
    return CPUQuantizedLinear(
        path=chosen,
        in_features=K,
        out_features=N,
        act_dtype=act_dtype,
        group_size=group_size,
        perm=perm,
        planes=planes,
        scale_zeros=tables,
    )
