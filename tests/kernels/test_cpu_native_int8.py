"""The native kernel's opt-in int8-activation path (`native_mm(..., int8=True)`) on AMX-INT8 tiles
(`amx=True`) and on AVX512-VNNI dot products (`amx=False`) against its torch spec
`int8_activation_matmul_reference`, the spec against the exact matmul on inputs it quantizes
without loss, the two variants against each other, and the path's choice and refusals."""

from __future__ import annotations

import pytest
import torch

from tsq_vllm.format.gptq import GPTQLayer, pack_linear
from tsq_vllm.kernels import cpu_native
from tsq_vllm.kernels.cpu_native import (
    INT8_SWITCH,
    amx_int8_unavailable_reason,
    int8_unavailable_reason,
    native_mm,
    pack_native,
    pack_native_planes,
    vnni_unavailable_reason,
)
from tsq_vllm.kernels.reference import (
    int8_activation_matmul_reference,
    quantize_activations,
)

TILES_REASON, VNNI_REASON = amx_int8_unavailable_reason(), vnni_unavailable_reason()
INT8_REASON = int8_unavailable_reason()
needs_int8 = pytest.mark.skipif(INT8_REASON is not None, reason=f"int8 path: {INT8_REASON}")
# `amx` of native_mm on the int8 path: the tile variant or the VNNI one, each where it runs.
VARIANTS = [
    pytest.param(
        True,
        id="tiles",
        marks=pytest.mark.skipif(TILES_REASON is not None, reason=f"tiles: {TILES_REASON}"),
    ),
    pytest.param(
        False,
        id="vnni",
        marks=pytest.mark.skipif(VNNI_REASON is not None, reason=f"VNNI: {VNNI_REASON}"),
    ),
]


def _layer(K: int, N: int, G: int, seed: int, bits: int = 4) -> GPTQLayer:
    g = torch.Generator().manual_seed(seed)
    n_groups = K // G
    codes = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (N, n_groups), generator=g, dtype=torch.int32)
    scales = (torch.rand(N, n_groups, generator=g) * 0.02 + 0.001).half()
    g_idx = torch.arange(K, dtype=torch.int32) // G
    return pack_linear(codes, scales, zeros, g_idx, bits, "gptq_v2", group_size=G)


def _native(layer: GPTQLayer) -> cpu_native.NativeInt4Weights:
    """The layer in the kernel's layout, as `kernels.cpu` packs it: o = −s·z."""
    codes, zeros = layer.unpack()
    s = layer.scales.float()
    return pack_native(codes, s, -s * zeros, layer.group_size)


def _x(M: int, K: int, seed: int) -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).bfloat16()


@pytest.mark.parametrize("G", [32, 64, 128])
def test_the_spec_is_the_exact_matmul_where_x_is_on_its_grid(G):
    """An x whose every group is sx·(integers with max |.| = 127) loses nothing to the int8
    grid: the spec is then the exact matmul (an independent oracle for its code and zero
    terms)."""
    K, N, M = 4 * G, 48, 5
    layer = _layer(K, N, G, seed=G)
    g = torch.Generator().manual_seed(1)
    ints = torch.randint(-127, 128, (M, K), generator=g).float()
    ints.view(M, K // G, G)[..., 0] = 127.0  # amax = 127·sx in every group
    sx = 2.0 ** torch.randint(-8, -2, (M, K // G, 1), generator=g).float()
    x = (ints.view(M, K // G, G) * sx).view(M, K)  # exact in fp32: powers of two times ints
    x8, got_sx = quantize_activations(x, G)
    assert torch.equal(x8, ints) and torch.equal(got_sx, sx.squeeze(-1))
    exact = x.double() @ layer.dequantize(torch.float32).double()  # fp32 decode is exact
    got = int8_activation_matmul_reference(x, layer).double()  # float64 inside, fp32 out
    bound = 2.0**-23 * exact.abs() + 1e-9
    assert ((got - exact).abs() <= bound).all()


def test_the_spec_rounds_each_group_on_its_own_grid():
    """x8 = round(x·127/amax) per row and group, ties to even; zero groups stay zero."""
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0]])
    x8, sx = quantize_activations(x, 4)
    assert x8.tolist() == [[64.0, -127.0, 32.0, 0.0, 0.0, 0.0, 0.0, 0.0]]  # 63.5 → 64 (even)
    assert torch.equal(sx, torch.tensor([[1.0 / 127.0, 0.0]]))  # fp32, as the kernel holds it
    # 1.1484375·127/2.296875 = 63.5 exactly; 127·(1/2.296875) would land below the tie.
    x8, _ = quantize_activations(torch.tensor([[1.1484375, 2.296875, 0.0, 0.0]]), 4)
    assert x8.tolist() == [[64.0, 127.0, 0.0, 0.0]]


@pytest.mark.parametrize("amx", VARIANTS)
def test_kernel_rounds_x_as_the_spec_does(amx):
    """With W = I (scale 1, zero 0) the path returns sx·x8 per element, so x8 can be read back
    from its output: it must be the spec's, tie for tie."""
    K, G = 256, 64
    eye = torch.eye(K, dtype=torch.int32)
    w = pack_native(eye, torch.ones(K // G, K), torch.zeros(K // G, K), G)
    x = _x(16, K, seed=9)
    x8, sx = quantize_activations(x, G)
    got = torch.round(native_mm(x, w, amx=amx, int8=True).float() / sx.repeat_interleave(G, 1))
    assert torch.equal(got, x8)


@pytest.mark.parametrize("amx", VARIANTS)
@pytest.mark.parametrize(
    "K,N,G",
    [(256, 96, 64), (192, 160, 64), (512, 288, 128), (1536, 96, 64)],
    ids=["plain", "n-padding", "g128", "long-k"],
)
@pytest.mark.parametrize("M", [1, 2, 9, 16])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_matches_its_spec(K, N, G, M, bits, amx):
    layer = _layer(K, N, G, seed=K + N + M + bits, bits=bits)
    x = _x(M, K, seed=M)
    y = native_mm(x, _native(layer), amx=amx, int8=True)
    ref = int8_activation_matmul_reference(x.float(), layer).double()
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    # The same x8 and sx (the kernel rounds as the spec does); then fp32 sums over K/G groups
    # and over each group's G values of x (the zero term), one bf16 rounding of y. mag bounds
    # every summed term.
    codes, zeros = layer.unpack()
    s = layer.scales.double().repeat_interleave(G, 0)
    mag = x.double().abs() @ (s * (codes.double() + zeros.double().repeat_interleave(G, 0)))
    bound = 2.0**-8 * ref.abs() + (K // G + G + 4) * 2.0**-23 * mag + 1e-6
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max():.3f}"


@pytest.mark.skipif(
    TILES_REASON is not None or VNNI_REASON is not None,
    reason=f"needs both variants: tiles: {TILES_REASON}; VNNI: {VNNI_REASON}",
)
@pytest.mark.parametrize("M", [1, 5, 16])
def test_tiles_and_vnni_give_the_same_bits(M):
    """Both variants sum the same integers and fold them in the same order."""
    layer = _layer(1536, 160, 64, seed=M)
    w, x = _native(layer), _x(M, 1536, seed=M)
    assert torch.equal(native_mm(x, w, amx=True, int8=True), native_mm(x, w, amx=False, int8=True))


@pytest.mark.skipif(VNNI_REASON is not None, reason=f"VNNI: {VNNI_REASON}")
@pytest.mark.parametrize("M", [9, 33, 130])
def test_vnni_takes_any_rows_each_as_alone(M):
    """Taller x (prefill) runs in blocks of 8 rows: every row gets the bits it gets alone, and
    the spec's value."""
    K, N, G = 512, 96, 64
    layer = _layer(K, N, G, seed=M)
    w, x = _native(layer), _x(M, K, seed=M)
    y = native_mm(x, w, amx=False, int8=True)
    for i in (0, M // 2, M - 1):
        assert torch.equal(y[i : i + 1], native_mm(x[i : i + 1], w, amx=False, int8=True))
    ref = int8_activation_matmul_reference(x.float(), layer).double()
    assert float((y.double() - ref).abs().max()) <= 2.0**-7 * float(ref.abs().max())


@pytest.mark.parametrize("amx", VARIANTS)
def test_kernel_error_is_the_activation_rounding(amx):
    """Against the exact matmul the path errs by about what rounding x to 8 bits costs, far above
    the bf16 path's error: the two are different numerics (why it is opt-in)."""
    layer = _layer(512, 64, 64, seed=3)
    x = _x(16, 512, seed=3)
    w = _native(layer)
    exact = x.double() @ layer.dequantize(torch.float32).double()
    int8 = (native_mm(x, w, amx=amx, int8=True).double() - exact).abs().mean()
    bf16 = (native_mm(x, w, int8=False).double() - exact).abs().mean()
    x8, sx = quantize_activations(x, 64)
    xq = (x8.view(16, 8, 64) * sx[..., None]).view(16, 512).double()
    codes, zeros = layer.unpack()
    sq = layer.scales.double().repeat_interleave(64, 0) * codes.double()  # the rounded x's term
    predicted = ((xq - x.double()) @ sq).abs().mean()
    assert 0.8 * predicted <= int8 <= 1.2 * predicted + bf16
    assert int8 > 4 * bf16


@pytest.mark.parametrize("amx", VARIANTS)
def test_zero_rows_and_threads(amx):
    """All-zero rows give zero (sx = 0, no 0/0); the result does not depend on the thread count."""
    layer = _layer(256, 160, 64, seed=5)
    w = _native(layer)
    x = _x(6, 256, seed=5)
    x[2] = 0
    y = native_mm(x, w, amx=amx, int8=True)
    assert bool(torch.isfinite(y).all()) and not bool(y[2].any())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_mm(x, w, amx=amx, int8=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y, one)


@pytest.mark.parametrize("amx", VARIANTS)
@pytest.mark.parametrize(
    "M,G,match", [(17, 64, "M <= 16"), (4, 32, "group_size % 64"), (4, 128, None)]
)
def test_forced_int8_refuses_what_it_cannot_run(M, G, match, amx):
    """The tiles take one row tile, VNNI any M; both need groups of whole 64-wide chunks."""
    w = _native(_layer(256, 32, G, seed=1))
    x = _x(M, 256, seed=1)
    if match is None or (M > 16 and not amx):
        assert native_mm(x, w, amx=amx, int8=True).shape == (M, 32)
    else:
        with pytest.raises(RuntimeError, match=match):
            native_mm(x, w, amx=amx, int8=True)


@needs_int8
def test_planes_are_refused():
    beta = torch.randint(0, 2, (2, 128, 16))
    w = pack_native_planes(beta, torch.rand(2, 2, 16), torch.rand(2, 16), 64)
    with pytest.raises(ValueError, match="4-bit codes"):
        native_mm(_x(1, 128, seed=0), w, int8=True)


@needs_int8
@pytest.mark.parametrize("switch", ["1", "0", None])
def test_the_switch_opts_in_where_the_path_runs(monkeypatch, switch):
    """INT8_SWITCH=1 sends a layer in 64-wide groups to the int8 path: up to 16 rows where the
    tiles run (more rows to the bf16 paths), any rows where only VNNI does; unset or 0, nothing
    goes there. `amx=False` takes the VNNI variant where the switch is on. The choice shows in
    the bits."""
    monkeypatch.setattr(cpu_native, "_int8_opt_in", None)  # read afresh by the next call
    if switch is None:
        monkeypatch.delenv(INT8_SWITCH, raising=False)
    else:
        monkeypatch.setenv(INT8_SWITCH, switch)
    w = _native(_layer(256, 64, 64, seed=2))
    x = _x(17, 256, seed=2)
    int8, bf16 = native_mm(x[:16], w, int8=True), native_mm(x[:16], w, int8=False)
    assert not torch.equal(int8, bf16)
    assert torch.equal(native_mm(x[:16], w), int8 if switch == "1" else bf16)
    tall_int8 = switch == "1" and TILES_REASON is not None
    assert torch.equal(native_mm(x, w), native_mm(x, w, int8=tall_int8))
    if VNNI_REASON is None:
        want = native_mm(x[:16], w, amx=False, int8=switch == "1")
        assert torch.equal(native_mm(x[:16], w, amx=False), want)
