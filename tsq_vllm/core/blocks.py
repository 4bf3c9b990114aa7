"""Row blocks of a bounded size, for elementwise work on matrices too large to copy whole."""

from __future__ import annotations

__all__ = ["row_slices"]


def row_slices(n_rows: int, row_len: int, elements: int) -> list[slice]:
    """Slices covering rows [0, n_rows), each of about `elements` values (at least one row) of
    rows `row_len` long; the last may reach past n_rows, which slicing clips."""
    rows = max(1, elements // max(row_len, 1))
    return [slice(i, i + rows) for i in range(0, n_rows, rows)]
