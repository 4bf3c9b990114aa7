import pytest
import torch
from safetensors.torch import load_file, save_file

from tsq_vllm.format import QuantizationConfig, dequantize, pack_linear, unpack_linear


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
    got_codes, got_zeros = unpack_linear(t, bits, fmt)
    assert torch.equal(got_codes, codes.t().int())
    assert torch.equal(got_zeros, zeros.t().int())
    W = dequantize(t.qweight, t.qzeros, t.scales, t.g_idx, bits, fmt, dtype=torch.float32)
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
    save_file(t.as_dict("layer"), tmp_path / "m.safetensors")
    back = load_file(tmp_path / "m.safetensors")
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(back[f"layer.{name}"], getattr(t, name)), name


def test_config_round_trip_and_gptq_tools_keys():
    cfg = QuantizationConfig(bits=3, group_size=64, tsq={"stage1": True})
    d = cfg.to_dict()
    assert d["quant_method"] == "tsq" and d["checkpoint_format"] == "gptq" and d["desc_act"] is False
    assert QuantizationConfig.from_dict(d) == cfg
    gptqmodel = {"bits": 4, "group_size": 128, "desc_act": True, "sym": True, "quant_method": "gptq",
                 "format": "gptq", "pack_dtype": "int32", "damp_percent": 0.05}
    read = QuantizationConfig.from_dict(gptqmodel)
    assert (read.bits, read.group_size, read.desc_act, read.damp_percent) == (4, 128, True, 0.05)


@pytest.mark.parametrize("field,value,msg", [
    ("bits", 5, "bits=5"), ("group_size", 96, "group_size=96"),
    ("checkpoint_format", "awq", "checkpoint_format='awq'"), ("damp_percent", 1.5, "damp_percent=1.5"),
])
def test_config_rejects(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        QuantizationConfig(**{field: value})


def _bad(fn):
    def make(bits, fmt):
        codes, scales, zeros, g_idx = _random_layer(bits, 32, zero_min=1 if fmt == "gptq" else 0)
        t = pack_linear(codes, scales, zeros, g_idx, bits, fmt)
        fn(t, bits)
        return t
    return make


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("corrupt,msg", [
    (lambda t, b: t.scales.view(-1)[7].fill_(float("nan")), r"L\.scales has 1 NaN/inf value\(s\)"),
    (lambda t, b: t.scales.view(-1)[0].fill_(float("-inf")), r"L\.scales has 1 NaN/inf value\(s\)"),
    (lambda t, b: setattr(t, "scales", t.scales.to(torch.int32)), r"L\.scales has dtype torch\.int32"),
    (lambda t, b: setattr(t, "qweight", t.qweight[1:]), r"L\.qweight is torch\.int32"),
    (lambda t, b: setattr(t, "qzeros", t.qzeros[:, 1:]), r"L\.qzeros is torch\.int32"),
    (lambda t, b: t.g_idx.view(-1)[0].fill_(4), r"L\.g_idx has groups outside \[0, 4\)"),
])
def test_check_tensors_refuses(bits, fmt, corrupt, msg):
    from tsq_vllm.format import check_tensors

    good = _bad(lambda t, b: None)(bits, fmt)
    check_tensors(good, bits, 32, fmt, "L", in_features=128, out_features=64)  # the intact layer passes
    with pytest.raises(ValueError, match=msg):
        check_tensors(_bad(corrupt)(bits, fmt), bits, 32, fmt, "L", in_features=128, out_features=64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_check_tensors_range_of_zero_points_depends_on_the_format(bits):
    """All-ones qzeros words decode to z = 2**bits - 1 in gptq_v2 (valid) and 2**bits in gptq (invalid)."""
    from tsq_vllm.format import check_tensors

    t = _bad(lambda t, b: t.qzeros.fill_(-1))(bits, "gptq_v2")
    check_tensors(t, bits, 32, "gptq_v2", "L")
    with pytest.raises(ValueError, match=rf"zero points in \[{1 << bits}, {1 << bits}\]"):
        check_tensors(t, bits, 32, "gptq", "L")


@pytest.mark.parametrize("missing", ["bits", "group_size"])
def test_config_without_bits_or_group_size_is_an_error(missing):
    d = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    del d[missing]
    with pytest.raises(ValueError, match=f"quantization_config has no '{missing}'"):
        QuantizationConfig.from_dict(d)


@pytest.mark.parametrize("field,value", [("checkpoint_format", "gptq_v2"), ("bits", 3), ("group_size", 32),
                                         ("sym", True)])
def test_config_must_match_its_recorded_fingerprint(field, value):
    fp = {"checkpoint_format": "gptq", "bits": 4, "group_size": 64, "sym": False, "files": {}}
    QuantizationConfig(bits=4, group_size=64, tsq={"integrity": fp})
    with pytest.raises(ValueError, match=f"{field}={value!r} differs from {field}={fp[field]!r} recorded"):
        QuantizationConfig(**{"bits": 4, "group_size": 64, field: value, "tsq": {"integrity": fp}})


def test_read_header_finds_truncation_and_padding(tmp_path):
    from tsq_vllm.format.integrity import read_header

    f = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(64), "b": torch.ones(3, 5)}, f)
    assert {k: v["shape"] for k, v in read_header(f).items()} == {"a": [64], "b": [3, 5]}
    data = f.read_bytes()
    for content, msg in ((data[:-4], "is truncated"), (data + b"\0", "padded or corrupt"), (data[:5], "too short"),
                         (b"\xff" * 8 + data[8:], "header claims")):
        f.write_bytes(content)
        with pytest.raises(ValueError, match=msg):
            read_header(f)
