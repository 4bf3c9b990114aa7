"""Bit packing of integer codes into int32 words, one implementation for every width.

GPTQ packs b-bit codes as a little-endian bit stream: value j of a packed run occupies bits
[j*b, (j+1)*b) of the stream, word w holding stream bits [32*w, 32*w + 32), low bits first.
For b in {2, 4, 8} a value never straddles two words, so value j lives in word j // (32/b) at
bit b*(j mod 32/b). For b = 3 the stream repeats every 32 values = 3 words, and values 10 and 21
straddle a word boundary. Seen from the stream, every width is the same loop; `Fraction(32, b)`
values fit in one word.
"""

from __future__ import annotations

from fractions import Fraction
from math import gcd, prod

import torch

from ..core.blocks import row_slices

__all__ = ["SUPPORTED_BITS", "pack", "unpack", "pack_factor", "run_length", "check_bits"]

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported: use one of {SUPPORTED_BITS}")


def pack_factor(bits: int) -> Fraction:
    """Codes per int32 word (32/3 for 3-bit)."""
    check_bits(bits)
    return Fraction(32, bits)


def run_length(bits: int) -> int:
    """Smallest count of codes that fills whole words: 16 for 2-bit, 32 for 3-bit, 8 for 4-bit."""
    check_bits(bits)
    return 32 // gcd(32, bits)


def _layout(bits: int) -> list[tuple[int, int]]:
    """(word index inside a run, bit shift) of every value of one run."""
    return [divmod(j * bits, 32) for j in range(run_length(bits))]


def _check_length(length: int, bits: int, what: str) -> None:
    n = run_length(bits)
    if length % n:
        raise ValueError(
            f"{what} has length {length}, which is not a multiple of {n}: {bits}-bit packing "
            f"stores {n} codes in {n * bits // 32} int32 word(s); pad or pick a shape that divides"
        )


def pack(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along `dim` into int32 words.

    The packed dimension shrinks by `Fraction(32, bits)`; every other dimension is kept.
    """
    check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    dim = dim % codes.ndim
    length = codes.shape[dim]
    _check_length(length, bits, f"packed dimension {dim}")
    c = codes.movedim(dim, -1)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(
            f"codes span [{int(c.min())}, {int(c.max())}], outside [0, {(1 << bits) - 1}] "
            f"for {bits}-bit packing"
        )
    lead = c.shape[:-1]
    c = c.reshape(prod(lead), length)  # [M, length]
    out = torch.empty(c.shape[0], length * bits // 32, dtype=torch.int32)
    # The shifts need int64; a block of rows at a time keeps that copy small (an lm_head's codes
    # are 2^28 values: 2 GiB as int64).
    for r in row_slices(c.shape[0], length, _BLOCK):
        out[r] = _pack_rows(c[r].to(torch.int64), bits)
    return out.reshape(*lead, out.shape[-1]).movedim(-1, dim).contiguous()


_BLOCK = 1 << 22  # codes per block of `pack`


def _pack_rows(c: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes [M, length] → int32 words [M, length * bits / 32]."""
    n = run_length(bits)
    words_per_run = n * bits // 32
    c = c.reshape(c.shape[0], c.shape[1] // n, n)  # [M, runs, n]
    out = torch.zeros(*c.shape[:-1], words_per_run, dtype=torch.int64)
    for j, (word, shift) in enumerate(_layout(bits)):
        v = c[..., j]
        out[..., word] |= (v << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the high bits spill into the next word
            out[..., word + 1] |= v >> (32 - shift)
    out = out.reshape(out.shape[0], out.shape[1] * words_per_run)  # [M, length * bits / 32]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of `pack`: int32 words along `dim` to int32 codes in [0, 2**bits)."""
    check_bits(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {packed.dtype}")
    dim = dim % packed.ndim
    n = run_length(bits)
    words_per_run = n * bits // 32
    n_words = packed.shape[dim]
    if n_words % words_per_run:
        raise ValueError(
            f"packed dimension {dim} has {n_words} words, not a multiple of {words_per_run} "
            f"(one {bits}-bit run)"
        )
    w = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(*w.shape[:-1], n_words // words_per_run, words_per_run)  # [..., runs, words]
    mask = (1 << bits) - 1
    values = []
    for word, shift in _layout(bits):
        v = w[..., word] >> shift
        if shift + bits > 32:
            v = v | (w[..., word + 1] << (32 - shift))
        values.append(v & mask)
    out = torch.stack(values, dim=-1).reshape(*w.shape[:-2], -1)  # [..., runs * n]
    return out.to(torch.int32).movedim(-1, dim).contiguous()
