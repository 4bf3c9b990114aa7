import pytest
import torch
from safetensors.torch import load_file, save_file

from tsq_vllm.format import CheckpointQuantConfig, pack_linear


def _random_layer(bits, group_size, N=64, K=128, seed=0, zero_min=1):
    g = torch.Generator().manual_seed(seed)
    n_g = K // group_size
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = (torch.rand(N, n_g, generator=g) + 0.1).half().float()
    zeros = torch.randint(zero_min, 1 << bits, (N, n_g), generator=g)
    g_idx = torch.arange(K) // group_size
    return codes, scales, zeros, g_idx


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_pack_linear_round_trip(bits, group_size, fmt):
    codes, scales, zeros, g_idx = _random_layer(bits, group_size, zero_min=1 if fmt == "gptq" else 0)
    t = pack_linear(codes, scales, zeros, g_idx, bits, fmt)
    K, N = codes.shape[1], codes.shape[0]
    assert t.qweight.shape == (K * bits // 32, N)
    assert t.qzeros.shape == (K // group_size, N * bits // 32)
    assert t.scales.dtype == torch.float16 and t.scales.shape == (K // group_size, N)
    assert (t.K, t.N, t.n_groups, t.group_size) == (K, N, K // group_size, group_size)
    got_codes, got_zeros = t.unpack()
    assert torch.equal(got_codes, codes.t().int())
    assert torch.equal(got_zeros, zeros.t().int())
    W = t.dequantize(dtype=torch.float32)
    expected = scales[:, g_idx] * (codes - zeros[:, g_idx]).float()  # [N, K]
    torch.testing.assert_close(W, expected.t(), rtol=0, atol=0)


def test_v1_stores_zero_minus_one():
    codes, scales, _, g_idx = _random_layer(4, 32, N=8, K=32)
    zeros = torch.full((8, 1), 8)
    t = pack_linear(codes, scales, zeros, g_idx, 4, "gptq")
    assert t.qzeros.tolist() == [[0x77777777]]
    t2 = pack_linear(codes, scales, zeros, g_idx, 4, "gptq_v2")
    assert t2.qzeros.tolist() == [[_s(0x88888888)]]


def _s(w):
    return w - (1 << 32)


def test_zero_point_zero_cannot_be_v1():
    codes, scales, zeros, g_idx = _random_layer(4, 32, N=8, K=32)
    zeros[3, 0] = 0
    with pytest.raises(ValueError, match="cannot be stored in checkpoint_format 'gptq'"):
        pack_linear(codes, scales, zeros, g_idx, 4, "gptq")


def test_safetensors_round_trip(tmp_path):
    codes, scales, zeros, g_idx = _random_layer(3, 32)
    t = pack_linear(codes, scales, zeros, g_idx, 3)
    save_file(t.tensors("layer"), tmp_path / "m.safetensors")
    back = load_file(tmp_path / "m.safetensors")
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(back[f"layer.{name}"], getattr(t, name)), name


def test_config_round_trip_and_gptq_tools_keys():
    cfg = CheckpointQuantConfig(bits=3, group_size=64, tsq={"stage1": True})
    d = cfg.to_dict()
    assert d["quant_method"] == "tsq" and d["checkpoint_format"] == "gptq" and d["desc_act"] is False
    assert CheckpointQuantConfig.from_dict(d) == cfg
    gptqmodel = {"bits": 4, "group_size": 128, "desc_act": True, "sym": True, "quant_method": "gptq",
                 "format": "gptq", "pack_dtype": "int32", "damp_percent": 0.05}
    read = CheckpointQuantConfig.from_dict(gptqmodel)
    assert (read.bits, read.group_size, read.desc_act, read.damp_percent) == (4, 128, True, 0.05)


@pytest.mark.parametrize("field,value,msg", [
    ("bits", 5, "bits=5"), ("group_size", 96, "group_size=96"),
    ("checkpoint_format", "awq", "checkpoint_format='awq'"), ("damp_percent", 1.5, "damp_percent=1.5"),
])
def test_config_rejects(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        CheckpointQuantConfig(**{field: value})
