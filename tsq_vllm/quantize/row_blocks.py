"""Row blocks of a wide linear (an lm_head of 152k rows), quantized one after the other.

Given the input's moments (H, R, D), every step of the per-linear math that costs O(N·K) memory
is independent per output row: stage 1 searches each row's clips, GPTQ propagates a row's error
along its own columns, GPTAQ's target and stage 2's quadratic (`ScaleSystem`) are per row, and so
are GPTQT's level search, second pass and re-exploration grid. Only stage 2's sweeps are not (they
stop on the objective summed over the layer; GPTQT's re-exploration runs them too): those run
once on the stacked per-row systems, which are small (n_groups² per row). So a linear is
quantized a block of rows at a time against the same prepared input, and its many [N, K]
float32/int64 intermediates exist for one block only.
"""

from __future__ import annotations

__all__ = ["BLOCK_ELEMENTS", "block_rows", "row_blocks"]

# One block's float32 [rows, K] is 256 MiB: the dozen such intermediates the math holds at once
# then stay near 3 GiB, while every decoder linear of a Llama-3-8B-sized model (gate/up: 14336 x
# 4096 = 2^25.8 elements) still fits in one block, so its result is the unblocked one bit for bit.
BLOCK_ELEMENTS = 1 << 26
_ALIGN = 64  # rows per block stay a multiple of 64: the block GEMMs keep their aligned shapes


def block_rows(K: int) -> int:
    """The most rows of a block for a linear with K inputs."""
    return max(_ALIGN, BLOCK_ELEMENTS // max(K, 1) // _ALIGN * _ALIGN)


def row_blocks(N: int, K: int) -> list[slice]:
    """The row blocks of an [N, K] weight, in order; one block (all rows) when it is small."""
    rows = block_rows(K)
    return [slice(r, min(r + rows, N)) for r in range(0, max(N, 1), rows)]
