"""vLLM's CPU WNA16 kernel (`kernels.wna16`) against the reference decode `GPTQLayer.dequantize`.

Two oracles. `test_exact`: power-of-two scales and small integer activations make every weight,
product and partial sum exact in bf16/fp32, so the kernel must return exactly the reference
rounded once to the output dtype; any wrong lane, column block, group or zero shows. `test_matches`:
realistic scales and activations, against an error bound derived from the kernel's roundings
(see `_bound`).
"""

from __future__ import annotations

import platform
from dataclasses import replace

import pytest
import torch

from tsq_vllm.format import GPTQLayer, pack_linear
from tsq_vllm.kernels import wna16
from tsq_vllm.kernels.wna16 import (
    can_implement,
    prepare_wna16,
    wna16_available,
    wna16_unavailable_reason,
)

needs_op = pytest.mark.skipif(
    not wna16_available(), reason=f"cpu_gemm_wna16 unavailable: {wna16_unavailable_reason()}"
)

K = 384  # splits into groups of 32, 64 and 128
# N per bits: a multiple of 32 and one that only fits the packing run (padded to 32 by the backend).
N_CASES = {2: (64, 48), 3: (64, 96), 4: (64, 40)}
GRID = [(b, n) for b in (2, 3, 4) for n in N_CASES[b]]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _layer(
    N: int, bits: int, G: int, fmt: str, *, exact: bool, act_order: bool = False, seed: int = 0
) -> GPTQLayer:
    gen = torch.Generator().manual_seed(seed)
    n_g = K // G
    codes = torch.randint(0, 2**bits, (N, K), generator=gen)
    # v1 stores z - 1: z in [1, 2**b] (at 4 bits capped at 15, what a 4-bit lane holds); v2 stores
    # z.
    lo, hi = (1, min(2**bits, 15) + 1) if fmt == "gptq" else (0, 2**bits)
    zeros = torch.randint(lo, hi, (N, n_g), generator=gen)
    if exact:
        scales = 2.0 ** -torch.randint(3, 7, (N, n_g), generator=gen).float()
    else:
        scales = (0.5 + torch.rand(N, n_g, generator=gen)) / 2**bits
    g_idx = torch.arange(K) // G
    if act_order:
        perm = torch.randperm(K, generator=gen)
        g_idx = torch.empty(K, dtype=torch.int64)
        g_idx[perm] = torch.arange(K) // G
    t = pack_linear(codes, scales, zeros, g_idx, bits, fmt)
    return t if act_order else replace(t, g_idx=None)


def _x(M: int, dtype: torch.dtype, *, exact: bool, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = (
        torch.randint(-4, 5, (M, K), generator=gen).float()
        if exact
        else torch.randn(M, K, generator=gen)
    )
    return x.to(dtype)


def _bound(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-element error bound. With u the dtype's unit roundoff, the kernel rounds the scale
    (|δ| <= u), the decoded weight (|δ| <= u), accumulates K products in fp32 (<= K·2^-24 of
    |x|·|W|) and rounds the output (<= u·|y|): |y - ref| <= (2u + u² + K·2^-24)(1 + u)·|x|·|W| +
    u·|y|, bounded here with a 1 % margin and |y| <= |ref| + the first term."""
    u = UNIT_ROUNDOFF[dtype]
    a = x.float().abs() @ w.abs()
    first = (2 * u + u * u + K * 2.0**-24) * (1 + u) * a
    return 1.01 * (first + u * (ref.abs() + first)) + 1e-30


def _reference(x: torch.Tensor, t: GPTQLayer) -> tuple[torch.Tensor, torch.Tensor]:
    w = t.dequantize(dtype=torch.float32)
    return x.float() @ w, w


@needs_op
@pytest.mark.parametrize("M", [1, 3, 17, 128])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize(("bits", "N"), GRID)
def test_exact(bits, N, G, fmt, M):
    t = _layer(N, bits, G, fmt, exact=True)
    assert can_implement(t, torch.bfloat16) == (True, None)
    x = _x(M, torch.bfloat16, exact=True)
    y = prepare_wna16(t)(x)
    ref, _ = _reference(x, t)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    assert torch.equal(y, ref.bfloat16()), (
        f"{(y != ref.bfloat16()).sum().item()} of {y.numel()} outputs differ"
    )


@needs_op
@pytest.mark.parametrize("M", [1, 3, 17, 128])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize(("bits", "N"), GRID)
def test_matches(bits, N, G, fmt, M):
    t = _layer(N, bits, G, fmt, exact=False, seed=G + M)
    x = _x(M, torch.bfloat16, exact=False, seed=M)
    y = prepare_wna16(t)(x).float()
    ref, w = _reference(x, t)
    err, bound = (y - ref).abs(), _bound(x, w, ref, torch.bfloat16)
    assert torch.isfinite(y).all()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    # Independent roundings average out: the relative Frobenius error is about u, a layout slip
    # O(1).
    rel = (torch.linalg.norm(y - ref) / torch.linalg.norm(ref)).item()
    assert rel < 3 * UNIT_ROUNDOFF[torch.bfloat16], rel


@needs_op
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize(("bits", "N"), GRID)
def test_act_order_and_dtypes(bits, N, fmt, dtype):
    """Act-order layers (input columns sorted by group at load) and fp16 activations."""
    t = _layer(N, bits, 64, fmt, exact=False, act_order=True, seed=bits)
    assert t.g_idx is not None and not t.is_sequential
    prepared = prepare_wna16(t, act_dtype=dtype)
    assert prepared.perm is not None
    x = _x(5, dtype, exact=False)
    y = prepared(x)
    assert y.dtype == dtype
    ref, w = _reference(x, t)
    assert (((y.float() - ref).abs()) <= _bound(x, w, ref, dtype)).all()


@needs_op
@pytest.mark.parametrize("N", [64, 40])  # 40: bias padded with the weight's columns
def test_bias_batch_dims_and_empty(N):
    t = _layer(N, 4, 32, "gptq_v2", exact=True)
    prepared = prepare_wna16(t)
    bias = 2.0 ** -torch.randint(0, 4, (N,)).float()
    x = _x(6, torch.bfloat16, exact=True).view(2, 3, K)
    y = prepared(x, bias)
    ref = (_reference(x.view(6, K), t)[0] + bias).bfloat16().view(2, 3, N)
    assert torch.equal(y, ref)
    assert prepared(torch.empty(0, K, dtype=torch.bfloat16), bias).shape == (0, N)
    with pytest.raises(ValueError, match=f"in_features={K}"):
        prepared(torch.empty(2, K + 32, dtype=torch.bfloat16))


@needs_op
def test_input_dtype_round_trip():
    """fp32 input runs in the prepared dtype and comes back as fp32."""
    t = _layer(64, 3, 64, "gptq", exact=True)
    x = _x(4, torch.bfloat16, exact=True)
    y = prepare_wna16(t)(x.float())
    assert y.dtype == torch.float32 and torch.equal(y, _reference(x, t)[0].bfloat16().float())


@needs_op
def test_prepared_sizes():
    t = _layer(48, 2, 64, "gptq", exact=True)
    p = prepare_wna16(t)
    assert (
        p.n_pad == 64
        and tuple(p.qweight.shape) == (4, 2 * K)
        and tuple(p.zeros.shape) == (K // 64, 8)
    )
    assert p.nbytes() == 4 * 2 * K * 4 + (K // 64) * 8 * 4 + (K // 64) * 64 * 2


# --- refusals -------------------------------------------------------------------------------


def _refused(t: GPTQLayer, dtype: torch.dtype, match: str) -> None:
    ok, reason = can_implement(t, dtype)
    assert not ok and reason is not None and match in reason, reason
    with pytest.raises(ValueError, match="cpu_gemm_wna16 cannot serve"):
        prepare_wna16(t, act_dtype=dtype)


@needs_op
def test_refuses_8_bit():
    _refused(_layer(64, 8, 64, "gptq_v2", exact=True), torch.bfloat16, "bits=8")


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_refuses_activation_dtype(dtype):
    _refused(_layer(64, 4, 64, "gptq", exact=True), dtype, "bfloat16 or float16")


@needs_op
@pytest.mark.parametrize(("z", "served"), [(16, False), (15, True)])
def test_v1_zero_16_at_4_bits(z, served):
    """GPTQ v1 stores z - 1, so a stored 15 is z = 16, one more than a 4-bit lane holds; 15 fits."""
    zeros = torch.full((64, K // 64), 3)
    zeros[5, 2] = z
    codes = torch.randint(0, 16, (64, K), generator=torch.Generator().manual_seed(0))
    t = pack_linear(codes, torch.ones(64, K // 64), zeros, torch.arange(K) // 64, 4, "gptq")
    if served:
        assert can_implement(t, torch.bfloat16) == (True, None)
    else:
        _refused(t, torch.bfloat16, "zero point of 16")


@needs_op
def test_refuses_act_order_without_whole_groups():
    """A g_idx whose groups hold unequal column counts cannot be sorted into G-column blocks."""
    G = 64
    g_idx = torch.arange(K) // G
    g_idx[G - 1] = 1  # group 0 now has G - 1 columns, group 1 has G + 1
    t = pack_linear(
        torch.randint(0, 8, (64, K)),
        torch.ones(64, K // G),
        torch.full((64, K // G), 4),
        g_idx,
        3,
        "gptq",
    )
    _refused(t, torch.bfloat16, "act-order g_idx")


@needs_op
def test_refuses_non_cpu_layer():
    t = _layer(64, 4, 64, "gptq", exact=True)
    meta = replace(
        t, qweight=t.qweight.to("meta"), qzeros=t.qzeros.to("meta"), scales=t.scales.to("meta")
    )
    ok, reason = can_implement(meta, torch.bfloat16)
    assert not ok and "meta" in reason


def test_refuses_when_op_missing(monkeypatch):
    """Whatever the host, a missing op is a refusal with its reason, never a crash at call time."""
    monkeypatch.setattr(wna16, "wna16_unavailable_reason", lambda: "no op in this build")
    assert not wna16.wna16_available()
    t = _layer(64, 4, 64, "gptq", exact=True)
    assert can_implement(t, torch.bfloat16) == (False, "no op in this build")
    with pytest.raises(ValueError, match="no op in this build"):
        prepare_wna16(t)


def test_available_where_vllm_loads_its_avx512_build():
    """vLLM's CPU platform loads a kernel library with cpu_gemm_wna16 on x86 CPUs with AVX-512 (its
    AVX2 build lacks it): there the backend must be found, so the tests above cannot skip
    silently."""
    pytest.importorskip("vllm")
    if (
        platform.machine().lower() not in ("x86_64", "amd64")
        or not torch.cpu._is_avx512_supported()
    ):
        pytest.skip(
            "not an x86 CPU with AVX-512: vLLM loads its AVX2 build, which has no cpu_gemm_wna16"
        )
    assert wna16_available(), wna16_unavailable_reason()
