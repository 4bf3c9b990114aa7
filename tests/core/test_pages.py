import sys

import pytest
import torch

import tsq_vllm.core.pages as pages
from tsq_vllm.core import HessianFactor, asymmetric_target, gptq_quantize, search_grid
from tsq_vllm.core.pages import release_zero_triangle

from .test_gptq import _damped

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux-only")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * pages.mmap.PAGESIZE


def _whole_zero_pages(A: torch.Tensor, upper: bool) -> int:
    """Bytes of the pages of A that hold only entries of the zero triangle, found page by page
    (the function under test walks column by column)."""
    K, size, page = A.shape[0], A.element_size(), pages.mmap.PAGESIZE
    idx = torch.arange(A.numel())
    row, col = idx % K, idx // K  # column-major storage
    zero = row < col if upper else row > col
    first = (-A.data_ptr()) % page // size  # elements before the first page boundary
    per_page = page // size
    n = (A.numel() - first) // per_page
    return int(zero[first : first + n * per_page].reshape(n, per_page).all(1).sum()) * page


def _column_major_triangular(K: int, upper: bool) -> torch.Tensor:
    """A column-major [K, K] float64 matrix, non-zero on and on one side of the diagonal, whose
    other strictly triangular part is zero."""
    A = torch.empty_strided((K, K), (1, K), dtype=torch.float64)
    A.copy_(torch.rand(K, K, generator=torch.Generator().manual_seed(K)) + 1.0)
    keep = torch.tril(A) if upper else torch.triu(A)  # upper=True: the upper part is the zeros
    A.copy_(keep)
    return A


@linux
@pytest.mark.parametrize("upper", [True, False], ids=["upper", "lower"])
def test_released_pages_read_back_as_the_zeros_they_held(upper):
    K = 2048  # 32 MiB: columns of 16 KiB, four pages each
    A = _column_major_triangular(K, upper)
    want = A.clone()
    before = _resident_bytes()
    released = release_zero_triangle(A, upper=upper, min_bytes=0)
    after = _resident_bytes()
    assert released == _whole_zero_pages(A, upper) > 0
    assert before - after >= 0.9 * released  # the pages left the process
    assert torch.equal(A, want)  # every value, the released zeros included, reads back the same
    A.fill_(2.0)  # the released pages are usable memory again
    assert bool((A == 2.0).all())


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(2048, 2048, dtype=torch.float64),  # row-major: not the layout it knows
        lambda: torch.zeros(2048, 1024, dtype=torch.float64).t(),  # not square
        lambda: torch.zeros(256, 256, dtype=torch.float64).t(),  # under the default 64 MiB
    ],
    ids=["row-major", "non-square", "small"],
)
def test_other_buffers_are_left_alone(make):
    A = make()
    default = A.numel() * A.element_size() < (1 << 26)
    assert release_zero_triangle(A, upper=True, min_bytes=None if default else 0) == 0


@linux
@pytest.mark.parametrize("order", [False, True], ids=["natural", "act-order"])
def test_the_factor_gives_the_same_bits_with_its_zero_triangles_released(order, monkeypatch):
    """GPTAQ's target and GPTQ's codes and loss with the zero triangles beside L and U released
    (every buffer, not only those of 64 MiB and more) against the same calls keeping them."""
    K = 1024  # 8 MiB factor buffer, columns of two pages: some pages go at every column
    Hd = _damped(K, seed=5, dead=2)
    W = torch.randn(48, K, generator=torch.Generator().manual_seed(6))
    WR = 0.1 * torch.randn(48, K, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grid = search_grid(W, 3, 64, method="minmax", zero_min=1)
    perm = torch.argsort(torch.diagonal(Hd), descending=True) if order else None

    def run() -> tuple[torch.Tensor, torch.Tensor, float]:
        f = HessianFactor(Hd, order=perm, solves=1, uses=1)
        target = asymmetric_target(W, f, None, 0.25, WR=WR)
        codes, loss = gptq_quantize(target, f, grid, 64, order=perm)
        return target, codes, loss

    calls = []
    real = pages.release_zero_triangle
    want = run()  # under the 64 MiB default: nothing released
    monkeypatch.setattr(pages, "_MIN_BYTES", 0)
    monkeypatch.setattr(
        "tsq_vllm.core.gptq.release_zero_triangle",
        lambda A, *, upper: calls.append(real(A, upper=upper)) or calls[-1],
    )
    got = run()
    assert len(calls) == 2 and all(n > 0 for n in calls)  # beside L, then beside U
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
