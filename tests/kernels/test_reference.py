"""The torch reference, input validation, backend dispatch and the tsq::dequant_matmul op."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from tsq_vllm.format import GPTQLayer, pack, unpack
from tsq_vllm.kernels import (
    dequant_matmul,
    dequant_matmul_op,
    dequant_matmul_reference,
    register_op,
)
from tsq_vllm.kernels.op import op_args

from .layers import activations, make_layer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_matches_hand_decode(bits, act_order, fmt):
    """Decode written out independently of tsq_vllm.format: W[k, n] = s[g, n] (c[k, n] - z[g,
    n])."""
    K, N, G = 128, 64, 32
    layer = make_layer(K, N, bits, G, act_order=act_order, fmt=fmt, seed=bits)
    t = layer.stored
    codes = unpack(t.qweight, bits, dim=0).double()
    z = unpack(t.qzeros, bits, dim=1).double() + (1 if fmt == "gptq" else 0)
    g = t.g_idx.long()
    w = t.scales.double()[g] * (codes - z[g])
    x = activations(5, K, torch.float32)
    y = dequant_matmul_reference(x, t)
    assert torch.allclose(y.double(), x.double() @ w, rtol=1e-5, atol=1e-5)
    if not act_order:  # g_idx None means k // G
        y_none = dequant_matmul_reference(x, replace(t, g_idx=None))
        assert torch.equal(y_none, y)


def test_reference_keeps_dtype_and_batch_dims():
    layer = make_layer(64, 32, 4, 32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(2, 3, 64).to(dtype)
        y = dequant_matmul_reference(x, layer.gptq)
        assert y.shape == (2, 3, 32) and y.dtype == dtype
    assert dequant_matmul_reference(torch.randn(0, 64), layer.gptq).shape == (0, 32)


def test_v1_largest_zero_point():
    """v1 stores z - 1: a stored 2**b - 1 means z = 2**b, not a wrap to 0."""
    K, N, G, bits = 32, 8, 32, 4
    qweight = pack(torch.full((K, N), 3), bits, dim=0)
    qzeros = pack(torch.full((1, N), 15), bits, dim=1)  # z = 16
    scales = torch.ones(1, N, dtype=torch.float16)
    x = torch.zeros(1, K)
    x[0, 0] = 1
    y = dequant_matmul_reference(
        x, GPTQLayer(qweight, qzeros, scales, None, bits=bits, group_size=G)
    )
    assert torch.equal(y, torch.full((1, N), -13.0))


@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.randn(2, 100), ValueError, r"x has K=100 input features but the layer takes K=128"),
        (torch.randn(2, 96), ValueError, r"K=96 .*qweight has shape \(16, 64\).*x matches"),
        (torch.randint(0, 3, (2, 128)), TypeError, r"x has dtype torch.int64"),
        (torch.randn(()), ValueError, r"expected \[\.\.\., K\]"),
    ],
)
def test_input_validation_messages(x, error, match):
    layer = make_layer(128, 64, 4, 32)
    with pytest.raises(error, match=match):
        dequant_matmul(x, layer.gptq)


def test_bad_backend():
    layer = make_layer(64, 32, 4, 32)
    x = torch.randn(1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="backend='cuda'"):
        dequant_matmul(x, layer.gptq, backend="cuda")


def test_default_backend_on_cpu_is_reference():
    layer = make_layer(128, 64, 3, 64, act_order=True)
    x = activations(4, 128, torch.bfloat16)
    assert torch.equal(dequant_matmul(x, layer.gptq), dequant_matmul_reference(x, layer.gptq))


def test_custom_op_cpu_fake_and_compile():
    op = register_op()
    assert register_op() is op
    layer = make_layer(128, 64, 3, 32, act_order=True)
    x = activations(3, 128, torch.float16).reshape(1, 3, 128)
    ref = dequant_matmul_reference(x, layer.gptq)
    assert torch.equal(dequant_matmul_op(x, layer.gptq), ref)
    torch.library.opcheck(op, (x, *op_args(layer.gptq)))
    torch.library.opcheck(
        op, (x, *op_args(replace(layer.gptq, g_idx=None, checkpoint_format="gptq_v2")))
    )

    def f(x):
        return dequant_matmul_op(x, layer.gptq) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), ref * 2)


def test_import_has_no_side_effects():
    """Importing the package neither registers the op nor imports triton."""
    code = (
        "import sys, tsq_vllm.kernels as k, tsq_vllm.kernels.op as op; "
        "assert op._op is None; assert 'triton' not in sys.modules, 'triton imported'; "
        "assert 'tsq_vllm.kernels.triton_kernels' not in sys.modules"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
