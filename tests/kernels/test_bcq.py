"""The BCQ dequant-matmul: the Triton kernel (interpreted, CPU) and the CPU paths against the
fp32 reference decode (`format.bcq.dequantize_bcq`), on layers whose levels lie on a b0-bit
integer axis as GPTQT's do."""

from __future__ import annotations

import pytest
import torch

from tsq_vllm.format.bcq import BCQTensors, pack_bcq
from tsq_vllm.kernels.bcq import (
    bcq_integer_grid,
    bcq_matmul,
    bcq_matmul_op,
    bcq_matmul_reference,
    prepare_cpu_bcq,
    register_bcq_op,
    select_cpu_bcq_path,
)
from tsq_vllm.kernels.cpu import int4_kernel_available
from tsq_vllm.kernels.cpu_native import ENV_SWITCH, NativePlaneWeights, native_unavailable_reason

from .layers import activations

DTYPES = (torch.float16, torch.bfloat16)


def make_bcq(K, N, k, G, *, b0=4, act_order=False, seed=0) -> BCQTensors:
    """Random GPTQT-like layer: per (row, group) integer steps d (descending, m + Σd <= 2^b0 - 1),
    scale s > 0 and zero z, so that every level is s (integer - z)."""
    g = torch.Generator().manual_seed(seed)
    M = (1 << b0) - 1
    n_g = K // G
    d = torch.randint(0, M // k + 1, (N, n_g, k), generator=g).sort(-1, descending=True).values
    m = (torch.rand(N, n_g, generator=g) * (M - d.sum(-1) + 1)).floor()
    s = (0.01 + 0.05 * torch.rand(N, n_g, generator=g)).half().float()
    z = torch.randint(1, M, (N, n_g), generator=g).float()
    signs = (torch.randint(0, 2, (k, N, K), generator=g) * 2 - 1).to(torch.int8)
    alpha = s[..., None] * d.float() / 2
    offset = s * (m + d.float().sum(-1) / 2 - z)
    g_idx = None
    if act_order:
        g_idx = (torch.arange(K) // G)[torch.randperm(K, generator=g)]
    return pack_bcq(signs, alpha, offset, g_idx)


def check_close(y, x, layer):
    ref = x.float() @ layer.dequantize(torch.float32)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all(), "non-finite outputs (unwritten tile?)"
    tol = 2e-3 if x.dtype == torch.float16 else 1.2e-2
    err = (y.float() - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), err


@pytest.fixture(scope="module")
def bt():
    from tsq_vllm.kernels import bcq_triton

    if not bcq_triton.is_interpreted():
        pytest.fail("bcq_jit was imported before TRITON_INTERPRET=1 was set (tests/kernels)")
    return bcq_triton


def _launch(bt, x, layer, config=None):
    out = torch.full((x.shape[0], layer.N), float("nan"), dtype=x.dtype)
    y = bt.launch_bcq(x, layer, config=config, out=out)
    assert y is out
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("M", [1, 16, 33])
def test_triton_kernel(bt, M, k, G, dtype):
    layer = make_bcq(256, 96, k, G, seed=k * 100 + G)
    x = activations(M, 256, dtype, seed=M)
    check_close(_launch(bt, x, layer), x, layer)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("M", [3, 70])
def test_triton_kernel_act_order(bt, M, k):
    layer = make_bcq(128, 80, k, 32, act_order=True, seed=M)
    x = activations(M, 128, torch.float16, seed=M)
    check_close(_launch(bt, x, layer), x, layer)


@pytest.mark.parametrize("label", ["bcq-M16", "bcq-M64", "bcq-M128+"])
def test_every_tile_class(bt, label):
    layer = make_bcq(256, 160, 3, 64, seed=5)
    x = activations(20, 256, torch.bfloat16)
    check_close(_launch(bt, x, layer, bt.BCQ_CONFIGS[label]), x, layer)


def test_dispatch_and_op_on_cpu():
    layer = make_bcq(128, 48, 3, 32)
    x = activations(5, 128, torch.float32)
    ref = bcq_matmul_reference(x, layer)
    torch.testing.assert_close(ref, x @ layer.dequantize(torch.float32), rtol=1e-5, atol=1e-5)
    assert torch.equal(bcq_matmul(x, layer), ref)
    register_bcq_op()
    assert torch.equal(bcq_matmul_op(x, layer), ref)
    with pytest.raises(ValueError, match="backend"):
        bcq_matmul(x, layer, backend="cuda")


@pytest.mark.parametrize("k,b0", [(2, 4), (3, 4), (3, 5)])
@pytest.mark.parametrize("act_order", [False, True])
def test_integer_grid_reproduces_the_decode(k, b0, act_order):
    layer = make_bcq(128, 40, k, 32, b0=b0, act_order=act_order, seed=k + b0)
    grid = bcq_integer_grid(layer, max_code=(1 << b0) - 1)
    assert grid is not None
    codes, step, low = grid
    assert int(codes.min()) >= 0 and int(codes.max()) <= (1 << b0) - 1
    g = layer.group_index()
    w = step[g] * codes.double() + low[g]
    ref = layer.dequantize(torch.float32).double()
    assert (w - ref).abs().max() <= 2**-8 * ref.abs().max()


def test_integer_grid_refuses_levels_off_any_grid():
    layer = make_bcq(64, 16, 2, 32)
    alpha = layer.bcq_alpha.clone()
    alpha[0], alpha[1] = 0.0123, 0.0123 / 3.7  # ratio 3.7: no integer steps
    assert bcq_integer_grid(BCQTensors(layer.bcq_bits, alpha, layer.bcq_offset)) is None


@pytest.mark.parametrize("path", ["dense", "planes", "int4", "native"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("M", [1, 16])
def test_cpu_paths(path, dtype, M):
    layer = make_bcq(256, 72, 3, 64, seed=M)
    prepared = prepare_cpu_bcq(layer, act_dtype=dtype, path=path)
    expected_path = path
    if path == "int4" and (dtype != torch.bfloat16 or not int4_kernel_available()):
        expected_path = "dense"
    if path == "native" and (dtype != torch.bfloat16 or native_unavailable_reason() is not None):
        expected_path = "dense"
    assert prepared.path == expected_path
    x = activations(M, 256, dtype, seed=3)
    bias = torch.randn(72)
    y = prepared(x, bias)
    ref = x.float() @ layer.dequantize(torch.float32) + bias
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype and (y.float() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("path", ["int4", "native"])
def test_beyond_16_codes_int4_goes_dense_and_native_reads_the_planes(path, act_order):
    layer = make_bcq(128, 32, 3, 32, b0=5, act_order=act_order, seed=11)
    if bcq_integer_grid(layer) is not None:
        pytest.skip("this draw happens to fit 16 codes")
    prepared = prepare_cpu_bcq(layer, act_dtype=torch.bfloat16, path=path)
    native = path == "native" and native_unavailable_reason() is None
    assert prepared.path == ("native" if native else "dense")
    assert native == isinstance(prepared.native, NativePlaneWeights)
    x = activations(5, 128, torch.bfloat16, seed=2)
    ref = x.float() @ layer.dequantize(torch.float32)
    assert (prepared(x).float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_default_path_is_native_then_int4_then_dense(monkeypatch):
    assert select_cpu_bcq_path(torch.float32) == "dense"
    native = native_unavailable_reason() is None
    aten = "int4" if int4_kernel_available() else "dense"
    assert select_cpu_bcq_path(torch.bfloat16) == ("native" if native else aten)
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert select_cpu_bcq_path(torch.bfloat16) == aten
