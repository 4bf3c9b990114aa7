"""The torch reference, input validation, backend dispatch and the tsq::dequant_matmul op."""

import os
import subprocess
import sys

import pytest
import torch

from tsq_vllm.format import pack, unpack
from tsq_vllm.kernels import (
    check_inputs,
    dequant_matmul,
    dequant_matmul_op,
    dequant_matmul_reference,
    register_op,
    sequential_g_idx,
)

from .layers import activations, make_layer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_matches_hand_decode(bits, act_order, fmt):
    """Decode written out independently of tsq_vllm.format: W[k, n] = s[g, n] (c[k, n] - z[g, n])."""
    K, N, G = 128, 64, 32
    layer = make_layer(K, N, bits, G, act_order=act_order, fmt=fmt, seed=bits)
    codes = unpack(layer.qweight, bits, dim=0).double()
    z = unpack(layer.qzeros, bits, dim=1).double() + (1 if fmt == "gptq" else 0)
    g = layer.g_idx_full.long()
    w = layer.scales.double()[g] * (codes - z[g])
    x = activations(5, K, torch.float32)
    y = dequant_matmul_reference(x, *layer.args[:3], layer.g_idx_full, bits=bits, checkpoint_format=fmt)
    assert torch.allclose(y.double(), x.double() @ w, rtol=1e-5, atol=1e-5)
    if not act_order:  # g_idx None means k // G
        y_none = dequant_matmul_reference(x, *layer.args[:3], None, bits=bits, checkpoint_format=fmt)
        assert torch.equal(y_none, y)


def test_reference_keeps_dtype_and_batch_dims():
    layer = make_layer(64, 32, 4, 32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(2, 3, 64).to(dtype)
        y = dequant_matmul_reference(x, *layer.args, bits=4)
        assert y.shape == (2, 3, 32) and y.dtype == dtype
    assert dequant_matmul_reference(torch.randn(0, 64), *layer.args, bits=4).shape == (0, 32)


def test_v1_largest_zero_point():
    """v1 stores z - 1: a stored 2**b - 1 means z = 2**b, not a wrap to 0."""
    K, N, G, bits = 32, 8, 32, 4
    qweight = pack(torch.full((K, N), 3), bits, dim=0)
    qzeros = pack(torch.full((1, N), 15), bits, dim=1)  # z = 16
    scales = torch.ones(1, N, dtype=torch.float16)
    x = torch.zeros(1, K)
    x[0, 0] = 1
    y = dequant_matmul_reference(x, qweight, qzeros, scales, None, bits=bits)
    assert torch.equal(y, torch.full((1, N), -13.0))


def test_sequential_g_idx():
    assert sequential_g_idx(None, 32)
    assert sequential_g_idx(torch.arange(128, dtype=torch.int32) // 32, 32)
    assert not sequential_g_idx(make_layer(128, 32, 4, 32, act_order=True).g_idx, 32)


def _bad(layer, **change):
    args = dict(x=torch.randn(2, 128, dtype=torch.float16), qweight=layer.qweight, qzeros=layer.qzeros,
                scales=layer.scales, g_idx=None, bits=4)
    args.update(change)
    return args


@pytest.mark.parametrize("change,error,match", [
    (dict(bits=5), ValueError, r"bits=5 .*use one of"),
    (dict(x=torch.randn(2, 100)), ValueError, r"K=100 .*multiple of 32"),
    (dict(x=torch.randn(2, 96)), ValueError, r"qweight has shape \(16, 64\).*\[12, 64\].*x matches"),
    (dict(x=torch.randint(0, 3, (2, 128))), TypeError, r"x has dtype torch.int64"),
    (dict(qweight=torch.zeros(16, 64)), TypeError, r"qweight has dtype torch.float32.*int32"),
    (dict(qzeros=torch.zeros(4, 4, dtype=torch.int32)), ValueError, r"qzeros has shape \(4, 4\).*\[4, 8\]"),
    (dict(scales=torch.ones(3, 64, dtype=torch.float16)), ValueError, r"3 groups for K=128"),
    (dict(scales=torch.ones(4, 64, dtype=torch.int32)), TypeError, r"scales has dtype torch.int32"),
    (dict(scales=torch.ones(4, 32, dtype=torch.float16)), ValueError, r"scales has shape \(4, 32\).*N=64"),
    (dict(g_idx=torch.zeros(64, dtype=torch.int32)), ValueError, r"g_idx has shape \(64,\).*\[128\]"),
    (dict(g_idx=torch.zeros(128)), TypeError, r"g_idx has dtype torch.float32"),
    (dict(bits=3), ValueError, r"qweight has shape \(16, 64\).*\[12, 64\]"),
])
def test_validation_messages(change, error, match):
    layer = make_layer(128, 64, 4, 32)
    args = _bad(layer, **change)
    with pytest.raises(error, match=match):
        check_inputs(args["x"], args["qweight"], args["qzeros"], args["scales"], args["g_idx"], args["bits"])
    with pytest.raises(error, match=match):
        dequant_matmul(args.pop("x"), args.pop("qweight"), args.pop("qzeros"), args.pop("scales"),
                       args.pop("g_idx"), **args)


def test_validation_n_not_word_aligned():
    layer = make_layer(64, 32, 3, 32)
    with pytest.raises(ValueError, match=r"N=20 at 3 bits"):
        check_inputs(torch.randn(1, 64), layer.qweight[:, :20], layer.qzeros, layer.scales[:, :20], None, 3)


def test_bad_format_and_backend():
    layer = make_layer(64, 32, 4, 32)
    x = torch.randn(1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="checkpoint_format='awq'"):
        dequant_matmul(x, *layer.args, bits=4, checkpoint_format="awq")
    with pytest.raises(ValueError, match="backend='cuda'"):
        dequant_matmul(x, *layer.args, bits=4, backend="cuda")


def test_default_backend_on_cpu_is_reference():
    layer = make_layer(128, 64, 3, 64, act_order=True)
    x = activations(4, 128, torch.bfloat16)
    assert torch.equal(dequant_matmul(x, *layer.args, bits=3), dequant_matmul_reference(x, *layer.args, bits=3))


def test_custom_op_cpu_fake_and_compile():
    op = register_op()
    assert register_op() is op
    layer = make_layer(128, 64, 3, 32, act_order=True)
    x = activations(3, 128, torch.float16).reshape(1, 3, 128)
    ref = dequant_matmul_reference(x, *layer.args, bits=3)
    assert torch.equal(dequant_matmul_op(x, *layer.args, bits=3), ref)
    torch.library.opcheck(op, (x, *layer.args, 3, "gptq"))
    torch.library.opcheck(op, (x, *layer.args[:3], None, 3, "gptq_v2"))

    def f(x):
        return dequant_matmul_op(x, *layer.args, bits=3) * 2

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
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
