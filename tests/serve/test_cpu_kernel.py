"""The CPU fast path (tsq_vllm.kernels.cpu) against the reference decode `GPTQLayer.dequantize`."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tsq_vllm.format import pack_linear
from tsq_vllm.kernels.cpu import prepare_cpu_linear, select_cpu_path
from tsq_vllm.kernels.cpu_native import native_unavailable_reason

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
    reason="torch without the CPU int4 matmul",
)


def _layer(
    bits: int,
    group: int,
    n_out: int = 96,
    k_in: int = 256,
    act_order: bool = False,
    seed: int = 0,
    fmt: str = "gptq",
):
    g = torch.Generator().manual_seed(seed)
    n_g = k_in // group
    codes = torch.randint(0, 1 << bits, (n_out, k_in), generator=g)
    scales = torch.rand(n_out, n_g, generator=g) * 0.02 + 0.001
    zeros = torch.randint(1 if fmt == "gptq" else 0, 1 << bits, (n_out, n_g), generator=g)
    if act_order:
        perm = torch.randperm(k_in, generator=g)
        g_idx = torch.empty(k_in, dtype=torch.long)
        g_idx[perm] = torch.arange(k_in) // group
    else:
        g_idx = torch.arange(k_in) // group
    return pack_linear(codes, scales, zeros, g_idx, bits, fmt)


def _check(
    t, bits: int, group: int, dtype: torch.dtype, m: int = 5, fmt: str = "gptq", **kw
) -> str:
    assert (t.bits, t.group_size, t.checkpoint_format) == (bits, group, fmt)
    w = t.dequantize(dtype=torch.float32)  # [K, N]
    lin = prepare_cpu_linear(t, act_dtype=dtype, **kw)
    x = torch.randn(m, w.shape[0], generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(w.shape[1]).to(dtype)
    y = lin(x, bias)
    assert y.dtype == dtype and y.shape == (m, w.shape[1])
    ref = x.float() @ w + bias.float()
    # Exact up to rounding in the activation dtype: the weight/scales and the output are rounded
    # once each (bf16: 2^-8 relative), so the error is bounded by a few ulps of |x|·|W|.
    ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-8}[dtype]
    bound = 4 * ulp * (x.float().abs() @ w.abs() + bias.float().abs()) + 1e-6
    err = (y.float() - ref).abs()
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max():.3f} on path {lin.path}"
    return lin.path


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "actorder"])
def test_fast_path_matches_reference(bits, group, dtype, act_order):
    path = _check(_layer(bits, group, act_order=act_order, seed=bits * group), bits, group, dtype)
    assert path == select_cpu_path(bits, dtype)
    expected = (
        {2: "int4", 3: "int4", 4: "int4", 8: "int4x2"}[bits] if dtype == torch.bfloat16 else "dense"
    )
    assert path == expected


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("m", [1, 17, 128])
def test_awkward_shapes(bits, m):
    # N = 40 is not a multiple of aten's 16-wide packing: the output is padded and sliced.
    t = _layer(bits, 32, n_out=160 if bits == 3 else 40, k_in=96)
    assert _check(t, bits, 32, torch.bfloat16, m=m) != "dense"


@pytest.mark.skipif(native_unavailable_reason() is not None, reason="no native kernel here")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "actorder"])
@pytest.mark.parametrize("m", [1, 16])
def test_native_path_matches_reference(bits, group, act_order, m):
    t = _layer(bits, group, act_order=act_order, seed=bits + group)
    assert _check(t, bits, group, torch.bfloat16, m=m, path="native") == "native"


def test_native_path_refusals_are_one_line():
    with pytest.raises(ValueError, match="path='native' cannot hold 8-bit"):
        prepare_cpu_linear(_layer(8, 64), path="native")
    with pytest.raises(ValueError, match="path='native' cannot serve this layer: .*use 'int4'"):
        prepare_cpu_linear(_layer(4, 64), act_dtype=torch.float16, path="native")


def test_gptq_v2_zero_points():
    t = _layer(4, 64, fmt="gptq_v2")
    assert _check(t, 4, 64, torch.bfloat16, fmt="gptq_v2") == "int4"


def test_uneven_groups_fall_back_to_dense():
    # A g_idx whose groups are not whole blocks of group_size columns cannot use the int4 kernel.
    t = _layer(4, 32, k_in=128)
    t = replace(t, g_idx=torch.tensor([0] * 40 + [1] * 24 + [2] * 32 + [3] * 32, dtype=torch.int32))
    assert _check(t, 4, 32, torch.bfloat16) == "dense"


@pytest.mark.parametrize("path", ["int4", "dense"])
def test_leading_dims_and_empty_batch(path):
    t = _layer(3, 64)
    lin = prepare_cpu_linear(t, path=path)
    x = torch.randn(2, 3, 256).bfloat16()
    y = lin(x)
    assert y.shape == (2, 3, 96)
    # The 2-D call skips the reshapes; every form of the same rows gives the same bits.
    assert torch.equal(lin(x.reshape(6, 256)), y.reshape(6, 96))
    assert torch.equal(lin(x[0, 1]), y[0, 1])
    wide = torch.randn(6, 512).bfloat16()
    wide[:, ::2] = x.reshape(6, 256)
    assert torch.equal(lin(wide[:, ::2]), y.reshape(6, 96))  # a strided view is copied
    assert lin(torch.randn(0, 256).bfloat16()).shape == (0, 96)
    for bad in (torch.randn(2, 128), torch.randn(2, 3, 128), torch.randn(128)):
        with pytest.raises(ValueError, match="in_features=256"):
            lin(bad.bfloat16())


def test_prepared_memory_is_smaller_than_bf16():
    t = _layer(4, 64, n_out=256, k_in=512)
    lin = prepare_cpu_linear(t)
    assert lin.nbytes() < 0.4 * 256 * 512 * 2


def test_bad_inputs_name_the_problem():
    t = _layer(4, 64)
    with pytest.raises(ValueError, match="g_idx spans"):
        prepare_cpu_linear(replace(t, g_idx=t.g_idx + 10))
    with pytest.raises(ValueError, match="path='int4x2' cannot hold 4-bit"):
        prepare_cpu_linear(t, path="int4x2")
    with pytest.raises(ValueError, match="act_dtype=torch.int8"):
        prepare_cpu_linear(t, act_dtype=torch.int8)
