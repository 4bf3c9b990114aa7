"""The native CPU kernel (`kernels.cpu_native`), both paths (AVX512-BF16 dot products, AMX tiles
where this CPU has them), for 4-bit codes and for bit planes, against a float64 matmul of the
weights it is given, its packed layouts bit by bit, and its refusals."""

from __future__ import annotations

import pytest
import torch

from tsq_vllm.kernels import cpu_native
from tsq_vllm.kernels.cpu_native import (
    AMX_MIN_ROWS,
    AMX_SWITCH,
    ENV_SWITCH,
    NativeInt4Weights,
    NativePlaneWeights,
    amx_unavailable_reason,
    native_mm,
    native_unavailable_reason,
    pack_native,
    pack_native_planes,
)

REASON = native_unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"native kernel: {REASON}")
AMX_REASON = amx_unavailable_reason()
# Each path, forced: the AVX-512 one runs wherever the kernel does, the AMX one where tiles do.
PATHS = [
    pytest.param(False, id="avx512"),
    pytest.param(
        True,
        id="amx",
        marks=pytest.mark.skipif(AMX_REASON is not None, reason=f"AMX: {AMX_REASON}"),
    ),
]


def _bound(ref: torch.Tensor, mag: torch.Tensor, terms: int, amx: bool) -> torch.Tensor:
    """One bf16 rounding of the output, plus fp32 accumulation over `terms` products; the AMX
    path also rounds every weight once to bf16 (half an ulp: 2^-9 of its magnitude)."""
    return 2.0**-8 * ref.abs() + (terms * 2.0**-23 + (2.0**-9 if amx else 0.0)) * mag + 1e-6


def _weights(K: int, N: int, G: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=g)
    s = torch.rand(K // G, N, generator=g) * 0.02 + 0.001
    o = (torch.rand(K // G, N, generator=g) - 0.5) * 0.2
    return q, s, o


def _oracle(x: torch.Tensor, q, s, o, G: int) -> torch.Tensor:
    w = s.double().repeat_interleave(G, 0) * q.double() + o.double().repeat_interleave(G, 0)
    return x.double() @ w, x.double().abs() @ w.abs()


@needs_kernel
@pytest.mark.parametrize(
    "K,N,G",
    [(256, 96, 64), (128, 80, 32), (192, 40, 64), (64, 16, 2), (512, 272, 128), (1088, 176, 64)],
    # k-blocks: 34 chunks of 32 (tall x on AMX: K blocks of 8, 8, 8, 8, 2), 11 tiles
    ids=["plain", "tile-tail", "n-padding", "g2", "g128", "k-blocks"],
)
@pytest.mark.parametrize("M", [1, 2, 3, 8, 9, 16, 17, 33, 130])
@pytest.mark.parametrize("amx", PATHS)
def test_kernel_matches_float64(K, N, G, M, amx):
    if amx and K % 32:
        pytest.skip("the AMX path needs K % 32 == 0")
    q, s, o = _weights(K, N, G, seed=K + N + M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).bfloat16()
    y = native_mm(x, pack_native(q, s, o, G), amx=amx)
    ref, mag = _oracle(x, q, s, o, G)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    # One row tile in whole-chunk groups takes the AMX path's exact-scale variant: no weight
    # rounding, the AVX-512 path's bound.
    bound = _bound(ref, mag, K, amx and (M > 16 or G % 32 != 0))
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max():.3f}"


def _planes(k: int, K: int, N: int, G: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    beta = torch.randint(0, 2, (k, K, N), generator=g)
    a = torch.rand(k, K // G, N, generator=g) * 0.05
    o = (torch.rand(K // G, N, generator=g) - 0.5) * 0.2
    return beta, a, o


def _planes_oracle(x: torch.Tensor, beta, a, o, G: int):
    w = (a.double().repeat_interleave(G, 1) * beta.double()).sum(0)
    w = w + o.double().repeat_interleave(G, 0)
    return x.double() @ w, x.double().abs() @ w.abs()


@needs_kernel
@pytest.mark.parametrize(
    "k,K,N,G",
    [(3, 256, 96, 64), (2, 128, 80, 32), (1, 192, 40, 64), (4, 64, 16, 2), (3, 512, 272, 128)],
    ids=["k3", "k2-tile-tail", "k1-n-padding", "k4-g2", "k3-g128"],
)
@pytest.mark.parametrize("M", [1, 3, 9, 17, 40])
@pytest.mark.parametrize("amx", PATHS)
def test_planes_kernel_matches_float64(k, K, N, G, M, amx):
    beta, a, o = _planes(k, K, N, G, seed=k + K + M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).bfloat16()
    y = native_mm(x, pack_native_planes(beta, a, o, G), amx=amx)
    ref, mag = _planes_oracle(x, beta, a, o, G)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    bound = _bound(ref, mag, k * K, amx)
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max():.3f}"


def test_planes_layout_bit_by_bit():
    k, K, N, G = 2, 8, 20, 4  # N pads to 32: two tiles, the second holding 4 real columns
    beta, a, o = _planes(k, K, N, G, seed=4)
    w = pack_native_planes(beta, a, o, G)
    assert w.packed.shape == (k, 2, K // 2) and w.scale.shape == (k, 2, K // G, 16)
    words = w.packed.to(torch.int64) & 0xFFFFFFFF
    for i in range(k):
        for t in range(2):
            for p in range(K // 2):
                for j in range(16):
                    for r in range(2):
                        n = 16 * t + j
                        bit = int(beta[i, 2 * p + r, n]) if n < N else 0
                        assert (int(words[i, t, p]) >> (2 * j + r)) & 1 == bit
    _assert_tile_major(w.scale, a, N)
    _assert_tile_major(w.offset, o, N)
    with pytest.raises(ValueError, match="only 0 and 1"):
        pack_native_planes(beta * 2, a, o, G)
    with pytest.raises(ValueError, match="scale must be contiguous fp32"):
        NativePlaneWeights(w.packed, w.scale[:1].contiguous(), w.offset, G, N)


@needs_kernel
@pytest.mark.parametrize("amx", PATHS)
@pytest.mark.parametrize("M", [11, 40])
def test_threads_split_columns_without_changing_bits(amx, M):
    q, s, o = _weights(256, 16 * 37, 64, seed=5)  # 37 tiles: uneven chunks and tails
    x = torch.randn(M, 256, generator=torch.Generator().manual_seed(2)).bfloat16()
    for w in (pack_native(q, s, o, 64), pack_native_planes(*_planes(3, 256, 16 * 37, 64, 6), 64)):
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = native_mm(x, w, amx=amx)
            torch.set_num_threads(2)
            two = native_mm(x, w, amx=amx)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(one, two)


@needs_kernel
@pytest.mark.parametrize("amx", PATHS)
@pytest.mark.parametrize(
    "batch,rows",
    [(slice(0, 16), slice(3, 9)), (slice(0, 70), slice(16, 56)), (slice(0, 70), slice(40, 70))],
    ids=["one-row-tile", "tall-in-tall", "two-row-tiles-in-tall"],
)
def test_a_row_does_not_depend_on_the_batch(amx, batch, rows):
    """Every row's sums run in one order whatever else is in the batch, so a row comes out bit
    for bit the same in any batch of the same regime. On AMX the regimes are one row tile (exact
    codes, fp32 scales) and more than 16 rows (bf16 weights: two row tiles, or panels with K
    blocks, here over 37 tiles, two panels on one thread)."""
    q, s, o = _weights(1088, 16 * 37, 64, seed=7)
    w = pack_native(q, s, o, 64)
    x = torch.randn(70, 1088, generator=torch.Generator().manual_seed(3)).bfloat16()
    full = native_mm(x[batch].contiguous(), w, amx=amx)
    part = native_mm(x[rows].contiguous(), w, amx=amx)
    assert torch.equal(part, full[rows.start - batch.start : rows.stop - batch.start])


@needs_kernel
def test_empty_batch_and_bad_inputs():
    q, s, o = _weights(128, 32, 64, seed=1)
    w = pack_native(q, s, o, 64)
    assert native_mm(torch.zeros(0, 128, dtype=torch.bfloat16), w).shape == (0, 32)
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        native_mm(torch.zeros(2, 128), w)
    with pytest.raises(RuntimeError, match="do not match"):
        native_mm(torch.zeros(2, 64, dtype=torch.bfloat16), w)


def test_pack_layout_byte_by_byte():
    K, N, G = 8, 20, 4  # N pads to 32: two tiles, the second holding 4 real columns
    q, s, o = _weights(K, N, G, seed=3)
    w = pack_native(q, s, o, G)
    assert w.packed.shape == (2, K // 2, 16) and w.scale.shape == (2, K // G, 16)
    for t in range(2):
        for p in range(K // 2):
            for j in range(16):
                n = 16 * t + j
                lo, hi = (int(q[2 * p, n]), int(q[2 * p + 1, n])) if n < N else (0, 0)
                assert int(w.packed[t, p, j]) == lo | (hi << 4)
    _assert_tile_major(w.scale, s, N)
    _assert_tile_major(w.offset, o, N)


def _assert_tile_major(table: torch.Tensor, want: torch.Tensor, N: int) -> None:
    """table [..., T, K/G, 16] holds want [..., K/G, N] at [..., t, b, j] = [..., b, 16t + j],
    zeros in the padded columns."""
    for t in range(table.shape[-3]):
        for b in range(table.shape[-2]):
            for j in range(16):
                n = 16 * t + j
                got = table[..., t, b, j]
                assert torch.equal(got, want[..., b, n].float()) if n < N else not got.any()


def test_weights_are_validated_once():
    q, s, o = _weights(64, 16, 32, seed=0)
    w = pack_native(q, s, o, 32)
    with pytest.raises(ValueError, match="group_size=3"):
        NativeInt4Weights(w.packed, w.scale, w.offset, 3, 16)
    with pytest.raises(ValueError, match="scale must be contiguous fp32"):
        NativeInt4Weights(w.packed, w.scale.half(), w.offset, 32, 16)
    with pytest.raises(ValueError, match="out_features=17"):
        NativeInt4Weights(w.packed, w.scale, w.offset, 32, 17)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_native(q + 1, s, o, 32)


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert native_unavailable_reason() == f"{ENV_SWITCH}=0 turns it off"


def test_a_failed_build_is_a_reason_not_an_error(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'tsq_cpu_gemm'\nmore lines")

    monkeypatch.setattr(cpu_native, "_built", None)
    monkeypatch.setattr(ext, "load", broken)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(cpu_native.platform, "machine", lambda: "x86_64")
    reason = native_unavailable_reason()
    assert reason == "the kernel did not build here (Error building extension 'tsq_cpu_gemm')"
    with pytest.raises(RuntimeError, match="did not build"):
        native_mm(
            torch.zeros(1, 64, dtype=torch.bfloat16), pack_native(*_weights(64, 16, 32, 0), 32)
        )


@needs_kernel
@pytest.mark.skipif(AMX_REASON is not None, reason=f"AMX: {AMX_REASON}")
def test_amx_is_chosen_by_rows_and_switched_off(monkeypatch):
    """The automatic choice: tiles from AMX_MIN_ROWS rows on, never with the switch off; the
    choice shows in the bits (with groups of 16, less than a tile chunk, the AMX path rounds
    weights to bf16, the AVX-512 one does not)."""
    q, s, o = _weights(256, 64, 16, seed=9)
    w = pack_native(q, s, o, 16)
    x = torch.randn(AMX_MIN_ROWS, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    tiles, dots = native_mm(x, w, amx=True), native_mm(x, w, amx=False)
    assert not torch.equal(tiles, dots)  # else this test could not tell the paths apart
    assert torch.equal(native_mm(x, w), tiles)
    assert torch.equal(native_mm(x[:-1], w), dots[:-1])
    monkeypatch.setenv(AMX_SWITCH, "0")
    assert amx_unavailable_reason() == f"{AMX_SWITCH}=0 turns it off"
    assert torch.equal(native_mm(x, w), dots)


@needs_kernel
@pytest.mark.skipif(AMX_REASON is not None, reason=f"AMX: {AMX_REASON}")
@pytest.mark.parametrize("group, one_row_on_tiles", [(64, True), (16, False)])
def test_amx_takes_one_row_where_the_exact_variant_runs(group, one_row_on_tiles):
    """One row goes to the tiles for 4-bit codes in groups of whole 32-wide chunks (the
    exact-scale variant), to the AVX-512 path otherwise."""
    q, s, o = _weights(256, 64, group, seed=4)
    w = pack_native(q, s, o, group)
    for seed in range(20):  # a row on which the two paths differ in their last bits
        x = torch.randn(1, 256, generator=torch.Generator().manual_seed(seed)).bfloat16()
        tiles, dots = native_mm(x, w, amx=True), native_mm(x, w, amx=False)
        if not torch.equal(tiles, dots):
            break
    else:
        pytest.fail("the paths agreed on every row tried: this test cannot tell them apart")
    assert torch.equal(native_mm(x, w), tiles if one_row_on_tiles else dots)


@needs_kernel
@pytest.mark.skipif(AMX_REASON is not None, reason=f"AMX: {AMX_REASON}")
def test_amx_refuses_k_off_the_tile_grid():
    q, s, o = _weights(48, 16, 16, seed=2)  # K = 48: not whole 32-wide tile chunks
    w = pack_native(q, s, o, 16)
    x = torch.randn(AMX_MIN_ROWS, 48).bfloat16()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        native_mm(x, w, amx=True)
    ref, mag = _oracle(x, q, s, o, 16)
    assert bool(((native_mm(x, w).double() - ref).abs() <= _bound(ref, mag, 48, False)).all())
