"""Kernel backends (`kernels.backends`): their refusals and reasons, each one's apply against the
reference (`kernels.reference.dequant_matmul_reference`), and the chooser's fall-through."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from tsq_vllm.format import GPTQLayer, pack_linear
from tsq_vllm.kernels import backends, cpu
from tsq_vllm.kernels import wna16 as wna16_mod
from tsq_vllm.kernels.backends import (
    PRIORITY,
    AtenInt4Backend,
    DenseBackend,
    LinearBackend,
    NativeInt4Backend,
    TritonBackend,
    WNA16Backend,
    choose_backend,
    prepare_backend,
)
from tsq_vllm.kernels.cpu_native import ENV_SWITCH, native_unavailable_reason
from tsq_vllm.kernels.reference import dequant_matmul_reference

from .layers import make_layer

K, N = 256, 96
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
HAS_WNA16 = wna16_mod.wna16_available()
HAS_INT4 = cpu.int4_kernel_available()
HAS_NATIVE = native_unavailable_reason() is None


def _uneven(bits: int = 4, G: int = 64) -> GPTQLayer:
    """An act-order g_idx whose groups hold G - 1 and G + 1 columns: no whole blocks of G."""
    t = make_layer(K, N, bits, G, act_order=True).stored
    g = (torch.arange(K) // G).to(torch.int32)
    g[G - 1] = 1
    return replace(t, g_idx=g)


def _row_shard(bits: int = 4, G: int = 64) -> GPTQLayer:
    """Rank 0 of 2 of an act-order row-parallel layer: K/2 columns, scales of all 2K/G groups."""
    full = make_layer(2 * K, N, bits, G, act_order=True).stored
    codes, zeros = full.unpack()
    keep = torch.arange(K)
    return pack_linear(
        codes[keep].t(),
        full.scales.float().t(),
        zeros.t(),
        full.g_idx[keep],
        bits,
        group_size=G,
    )


def _seq(bits: int = 3, G: int = 64, fmt: str = "gptq") -> GPTQLayer:
    return make_layer(K, N, bits, G, fmt=fmt).gptq


CASES = [
    # backend, layer, act dtype, accepted?, reason fragment
    (TritonBackend, _seq, BF16, False, "run on CUDA"),
    (NativeInt4Backend, _seq, BF16, HAS_NATIVE, None),
    (NativeInt4Backend, _seq, FP16, False, "takes bf16"),
    (NativeInt4Backend, lambda: _seq(bits=8), BF16, False, "bits=8"),
    (NativeInt4Backend, _uneven, BF16, False, "does not regroup"),
    (NativeInt4Backend, _row_shard, BF16, False, "does not regroup"),
    (AtenInt4Backend, _seq, BF16, HAS_INT4, None if HAS_INT4 else "torch >= 2.5"),
    (AtenInt4Backend, _seq, FP16, False, "only with bf16"),
    (AtenInt4Backend, _seq, FP32, False, "only with bf16"),
    (AtenInt4Backend, _uneven, BF16, False, "does not regroup"),
    (AtenInt4Backend, _row_shard, BF16, False, "does not regroup"),
    (WNA16Backend, _seq, BF16, HAS_WNA16, None),
    (WNA16Backend, _seq, FP16, HAS_WNA16, None),
    (WNA16Backend, _seq, FP32, False, None),
    (WNA16Backend, lambda: _seq(bits=8), BF16, False, None),
    (WNA16Backend, _uneven, BF16, False, None),
    (WNA16Backend, _row_shard, BF16, False, "row-parallel shard"),
    (DenseBackend, _uneven, BF16, True, None),
    (DenseBackend, _row_shard, FP32, True, None),
]


@pytest.mark.parametrize(
    "backend,build,dtype,ok,needle",
    CASES,
    ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)],
)
def test_can_implement_says_why_not(backend, build, dtype, ok, needle):
    accepted, reason = backend.can_implement(build(), dtype)
    assert accepted is bool(ok)
    if accepted:
        assert reason is None
    else:
        assert reason  # a refusal always says why
        if needle is not None:
            assert needle in reason, reason


@pytest.mark.skipif(not HAS_WNA16, reason="cpu_gemm_wna16 unavailable here")
@pytest.mark.parametrize(
    "build,dtype,needle",
    [
        (_seq, FP32, "bfloat16 or float16"),
        (lambda: _seq(bits=8), BF16, "bits=8"),
        (_uneven, BF16, "does not regroup"),
    ],
)
def test_wna16_reasons_where_the_op_exists(build, dtype, needle):
    accepted, reason = WNA16Backend.can_implement(build(), dtype)
    assert not accepted and reason is not None and needle in reason, reason


def test_wna16_reason_when_the_op_is_missing(monkeypatch):
    monkeypatch.setattr(wna16_mod, "wna16_unavailable_reason", lambda: "no op in this build")
    assert WNA16Backend.can_implement(_seq(), BF16) == (False, "no op in this build")


def _available(backend: type[LinearBackend], dtype: torch.dtype) -> None:
    ok, reason = backend.can_implement(_seq(), dtype)
    if not ok:
        pytest.skip(f"{backend.name} cannot run here: {reason}")


APPLY = [
    (NativeInt4Backend, BF16, 4, "gptq"),
    (NativeInt4Backend, BF16, 3, "gptq"),
    (NativeInt4Backend, BF16, 2, "gptq_v2"),
    (AtenInt4Backend, BF16, 4, "gptq"),
    (AtenInt4Backend, BF16, 2, "gptq_v2"),
    (AtenInt4Backend, BF16, 8, "gptq"),
    (WNA16Backend, BF16, 3, "gptq"),
    (WNA16Backend, FP16, 4, "gptq_v2"),
    (DenseBackend, FP32, 3, "gptq"),
    (DenseBackend, BF16, 8, "gptq_v2"),
    (DenseBackend, FP16, 2, "gptq"),
]
ULP = {FP32: 2.0**-23, FP16: 2.0**-10, BF16: 2.0**-8}


@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "actorder"])
@pytest.mark.parametrize("backend,dtype,bits,fmt", APPLY)
def test_apply_matches_reference(backend, dtype, bits, fmt, act_order):
    _available(backend, dtype)
    lay = make_layer(K, N, bits, 64, act_order=act_order, fmt=fmt, seed=bits)
    layer = lay.gptq
    if backend is WNA16Backend and bits == 4 and fmt == "gptq":
        pytest.skip("a v1 zero of 16 does not fit wna16's lanes (its own tests cover that)")
    ok, reason = backend.can_implement(layer, dtype)
    assert ok, reason
    prepared = backend.prepare(layer, dtype)
    assert prepared.name == backend.name and prepared.nbytes() > 0
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(3)).to(dtype)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = prepared.apply(x, bias)
    ref = dequant_matmul_reference(x.float(), lay.stored) + bias.float()
    assert y.shape == (2, 5, N) and y.dtype == dtype
    # Rounded once each: the weight (or scales) and the output in the activation dtype.
    w = lay.weight().abs()
    bound = 4 * ULP[dtype] * (x.float().abs() @ w + bias.float().abs()) + 1e-6
    err = (y.float() - ref).abs()
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max():.3f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton backend needs CUDA")
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_triton_apply_matches_reference(dtype):
    lay = make_layer(K, N, 3, 64, act_order=True, seed=3)
    layer = lay.on("cuda")
    assert TritonBackend.can_implement(layer, dtype) == (True, None)
    prepared = TritonBackend.prepare(layer, dtype)
    x = torch.randn(7, K, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = prepared.apply(x.cuda()).cpu()
    ref = dequant_matmul_reference(x.float(), lay.stored)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_priority_is_triton_then_native_then_aten_int4_then_wna16_then_dense():
    names = [b.name for b in PRIORITY]
    assert names == ["triton", "native-int4", "aten-int4", "wna16", "dense"]


@pytest.mark.skipif(not HAS_NATIVE, reason="the native kernel cannot run here")
def test_cpu_bf16_chooses_the_native_kernel_after_rejecting_triton():
    choice = choose_backend(_seq(), BF16)
    assert choice.backend is NativeInt4Backend
    assert [name for name, _ in choice.rejected] == ["triton"]


@pytest.mark.skipif(not HAS_INT4, reason="torch without aten's CPU int4 matmul")
def test_with_the_native_kernel_off_cpu_bf16_chooses_aten_int4(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    choice = choose_backend(_seq(), BF16)
    assert choice.backend is AtenInt4Backend
    assert dict(choice.rejected)["native-int4"] == f"{ENV_SWITCH}=0 turns it off"


def test_fp32_falls_through_to_dense_with_every_reason():
    choice = choose_backend(_seq(), FP32)
    assert choice.backend is DenseBackend
    names = [name for name, _ in choice.rejected]
    assert names == ["triton", "native-int4", "aten-int4", "wna16"]
    assert all(reason for _, reason in choice.rejected)


def test_fp16_goes_to_wna16_where_it_exists_else_dense():
    choice = choose_backend(_seq(bits=3), FP16)
    assert choice.backend is (WNA16Backend if HAS_WNA16 else DenseBackend)
    assert dict(choice.rejected)["aten-int4"].endswith("only with bf16 activations")


def test_without_aten_int4_bf16_goes_to_wna16_or_dense(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    monkeypatch.setattr(backends, "int4_kernel_available", lambda: False)
    choice = choose_backend(_seq(bits=3), BF16)
    assert choice.backend is (WNA16Backend if HAS_WNA16 else DenseBackend)
    assert "torch >= 2.5" in dict(choice.rejected)["aten-int4"]


def test_uneven_act_order_goes_to_dense():
    choice = choose_backend(_uneven(), BF16)
    assert choice.backend is DenseBackend
    y = prepare_backend(_uneven(), BF16).apply(torch.ones(1, K, dtype=BF16))
    assert y.shape == (1, N)


def test_no_backend_is_one_error_with_every_reason():
    with pytest.raises(ValueError, match=r"model\.x: no kernel backend .*triton: .*aten-int4: "):
        choose_backend(_seq(), FP32, (TritonBackend, AtenInt4Backend), where="model.x")


def test_choice_is_logged_once_per_shape(caplog, monkeypatch):
    monkeypatch.setattr(backends, "_logged", set())
    with caplog.at_level(logging.INFO, logger=backends.__name__):
        for _ in range(3):
            choose_backend(_seq(), FP32, where="model.layers.0.mlp.down_proj")
        choose_backend(make_layer(K, 2 * N, 4, 64).gptq, FP32, where="model.lm_head")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "using dense backend" in lines[0] and "triton: the layer is on cpu" in lines[0]
    assert "down_proj" in lines[0] and "lm_head" in lines[1]
