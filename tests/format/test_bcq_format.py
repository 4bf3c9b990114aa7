import pytest
import torch
from safetensors.torch import load_file, save_file

from tsq_vllm.core import damp_hessian, gptq_quantize, search_grid
from tsq_vllm.core.gptqt import GPTQTSettings, gptqt_convert
from tsq_vllm.format import pack_linear
from tsq_vllm.format.bcq import (
    BCQTensors,
    dequantize_bcq,
    pack_bcq,
    pack_planes,
    unpack_bcq,
    unpack_planes,
)

from ..core.conftest import correlated_inputs


def _random_bcq(k, N=24, K=128, G=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (k, N, K), generator=g) * 2 - 1).to(torch.int8)
    alpha = (torch.rand(N, K // G, k, generator=g) + 0.05).half().float()
    offset = torch.randn(N, K // G, generator=g).half().float()
    return signs, alpha, offset


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("K", [32, 128])
def test_planes_round_trip(k, K):
    signs, _, _ = _random_bcq(k, K=K)
    packed = pack_planes(signs)
    assert packed.dtype == torch.int32 and packed.shape == (k, K // 32, 24)
    assert torch.equal(unpack_planes(packed), signs.transpose(1, 2))


def test_bit_layout_is_little_endian_along_k():
    # Plane 1, output 2: inputs 0, 5 and 31 positive in word 0; input 32 + 3 in word 1.
    signs = -torch.ones(2, 3, 64, dtype=torch.int8)
    for col in (0, 5, 31, 35):
        signs[1, 2, col] = 1
    words = pack_planes(signs)
    expected_w0 = (1 << 0) | (1 << 5) | (1 << 31)
    assert int(words[1, 0, 2]) == expected_w0 - (1 << 32)  # stored as two's complement int32
    assert int(words[1, 1, 2]) == 1 << 3
    assert int(words.abs().sum()) == abs(expected_w0 - (1 << 32)) + (1 << 3)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("G", [32, 64])
def test_pack_bcq_round_trip(k, G):
    signs, alpha, offset = _random_bcq(k, G=G)
    t = pack_bcq(signs, alpha, offset)
    assert t.bcq_alpha.shape == (k, 128 // G, 24) and t.bcq_alpha.dtype == torch.float16
    assert t.bcq_offset.shape == (128 // G, 24) and t.g_idx is None
    s2, a2, o2 = unpack_bcq(t)
    assert torch.equal(s2, signs) and torch.equal(a2, alpha) and torch.equal(o2, offset)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("with_g_idx", [False, True])
def test_dequantize_bcq_formula(k, with_g_idx):
    signs, alpha, offset = _random_bcq(k)
    g_idx = None
    col_group = torch.arange(128) // 32
    if with_g_idx:  # act-order style: groups are not contiguous column ranges
        col_group = col_group[torch.randperm(128, generator=torch.Generator().manual_seed(2))]
        g_idx = col_group
    t = pack_bcq(signs, alpha, offset, g_idx)
    W = dequantize_bcq(
        t.bcq_bits, t.bcq_alpha, t.bcq_offset, t.g_idx, dtype=torch.float32
    )  # [K, N]
    expected = (
        torch.einsum("ink,nki->nk", signs.double(), alpha.double()[:, col_group])
        + offset.double()[:, col_group]
    )
    torch.testing.assert_close(W.double(), expected.t(), rtol=0, atol=1e-5)
    assert dequantize_bcq(t.bcq_bits, t.bcq_alpha, t.bcq_offset, t.g_idx).dtype == torch.float16


def _gptqt_layer(k, b0, G):
    g = torch.Generator().manual_seed(3)
    X = correlated_inputs(256, 1024)
    W, H = torch.randn(64, 256, generator=g), X.t() @ X / 1024
    Hd = damp_hessian(H, 0.01)
    grid = search_grid(W, b0, G, method="hessian", H=Hd, zero_min=1)
    codes, _ = gptq_quantize(W, Hd, grid, G)
    return gptqt_convert(W, H, codes, grid, G, GPTQTSettings(k), H_damped=Hd)


@pytest.mark.parametrize("k,b0", [(2, 4), (3, 4), (2, 5), (3, 5)])
@pytest.mark.parametrize("G", [32, 64])
def test_bcq_decode_equals_the_b0_bit_gptq_decode(k, b0, G):
    bw = _gptqt_layer(k, b0, G)
    t = pack_bcq(bw.signs, bw.scaled_alpha(), bw.scaled_offset())
    bcq = dequantize_bcq(t.bcq_bits, t.bcq_alpha, t.bcq_offset, dtype=torch.float32)  # [K, N]
    # The same weights as a plain GPTQ checkpoint: b0 = 5 needs the 8-bit container.
    container = b0 if b0 == 4 else 8
    col_group = torch.arange(256) // G
    gp = pack_linear(bw.codes, bw.scale, bw.zero, col_group, container, "gptq")
    gptq = gp.dequantize(dtype=torch.float32)
    # Both readings round to fp16 differently, a_i and o (BCQ) against s (GPTQ): each rounding
    # moves its term by at most 2^-11 of its size, which bounds the gap element by element.
    a = bw.scaled_alpha().abs().sum(-1) + bw.scaled_offset().abs()  # [N, n_g]
    u = (bw.codes - bw.zero.repeat_interleave(G, 1)).abs().float()
    bound = (
        2**-11 * (a.repeat_interleave(G, 1) + bw.scale.abs().repeat_interleave(G, 1) * u).t()
    )  # [K, N]
    assert ((bcq - gptq).abs() <= bound + 1e-7).all()
    assert ((bcq - bw.dequantize().t()).abs() <= bound + 1e-7).all()


@pytest.mark.parametrize("with_g_idx", [False, True])
def test_safetensors_round_trip(tmp_path, with_g_idx):
    signs, alpha, offset = _random_bcq(3)
    t = pack_bcq(signs, alpha, offset, torch.arange(128) // 32 if with_g_idx else None)
    save_file(t.tensors("layer"), tmp_path / "m.safetensors")
    back = load_file(tmp_path / "m.safetensors")
    names = {"layer.bcq_bits", "layer.bcq_alpha", "layer.bcq_offset"} | (
        {"layer.g_idx"} if with_g_idx else set()
    )
    assert set(back) == names
    t2 = BCQTensors(
        back["layer.bcq_bits"],
        back["layer.bcq_alpha"],
        back["layer.bcq_offset"],
        back.get("layer.g_idx"),
    )
    assert torch.equal(
        dequantize_bcq(t2.bcq_bits, t2.bcq_alpha, t2.bcq_offset, t2.g_idx),
        dequantize_bcq(t.bcq_bits, t.bcq_alpha, t.bcq_offset, t.g_idx),
    )


def test_rejects_bad_layers():
    signs, alpha, offset = _random_bcq(2)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_planes(signs[:, :, :48])
    with pytest.raises(ValueError, match="-1 or \\+1"):
        pack_planes(signs * 0)
    big = alpha.clone()
    big[0, 0, 0] = 1e6  # overflows fp16
    with pytest.raises(ValueError, match="non-finite"):
        pack_bcq(signs, big, offset)
    with pytest.raises(ValueError, match="must be \\[N=24, n_g, k=2\\]"):
        pack_bcq(signs, alpha[..., :1], offset)
    t = pack_bcq(signs, alpha, offset)
    with pytest.raises(ValueError, match="g_idx must be int32"):
        BCQTensors(t.bcq_bits, t.bcq_alpha, t.bcq_offset, torch.full((128,), 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="bcq_bits must be int32"):
        BCQTensors(t.bcq_bits.long(), t.bcq_alpha, t.bcq_offset)
    with pytest.raises(ValueError, match="bcq_offset must be"):
        BCQTensors(t.bcq_bits, t.bcq_alpha, t.bcq_offset[:1])
