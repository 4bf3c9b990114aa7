from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from tsq_vllm.format import (
    CheckpointQuantConfig,
    GPTQLayer,
    check_linear_shape,
    pack_linear,
    packed_shapes,
)

from ..kernels.layers import make_layer


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
    codes, scales, zeros, g_idx = _random_layer(
        bits, group_size, zero_min=1 if fmt == "gptq" else 0
    )
    t = pack_linear(codes, scales, zeros, g_idx, bits, fmt)
    K, N = codes.shape[1], codes.shape[0]
    assert t.qweight.shape == (K * bits // 32, N)
    assert t.qzeros.shape == (K // group_size, N * bits // 32)
    assert t.scales.dtype == torch.float16 and t.scales.shape == (K // group_size, N)
    assert (t.K, t.N, t.n_groups, t.group_size) == (K, N, K // group_size, group_size)
    stored = {k.split(".")[-1]: tuple(v.shape) for k, v in t.tensors("l").items()}
    assert stored == packed_shapes(K, N, bits, K // group_size)
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
    assert (
        d["quant_method"] == "tsq" and d["checkpoint_format"] == "gptq" and d["desc_act"] is False
    )
    assert CheckpointQuantConfig.from_dict(d) == cfg
    gptqmodel = {
        "bits": 4,
        "group_size": 128,
        "desc_act": True,
        "sym": True,
        "quant_method": "gptq",
        "format": "gptq",
        "pack_dtype": "int32",
        "damp_percent": 0.05,
    }
    read = CheckpointQuantConfig.from_dict(gptqmodel)
    assert (read.bits, read.group_size, read.desc_act, read.damp_percent) == (4, 128, True, 0.05)


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("bits", 5, "bits=5"),
        ("group_size", 96, "group_size=96"),
        ("checkpoint_format", "awq", "checkpoint_format='awq'"),
        ("damp_percent", 1.5, "damp_percent=1.5"),
    ],
)
def test_config_rejects(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        CheckpointQuantConfig(**{field: value})


@pytest.mark.parametrize(
    "K,N,bits,group_size,match",
    [
        (128, 64, 5, 32, r"bits=5 is not supported"),
        (128, 64, 4, 48, r"group_size=48 is not a multiple of 32"),
        (
            96,
            64,
            4,
            64,
            r"in_features=96 is not a multiple of group_size=64: pick a group size that divides 96",
        ),
        (
            128,
            16,
            3,
            32,
            r"out_features=16 is not a multiple of 32, which 3-bit GPTQ packing needs",
        ),
        (128, 8, 2, 32, r"out_features=8 is not a multiple of 16, which 2-bit"),
        (128, 4, 4, 32, r"out_features=4 is not a multiple of 8, which 4-bit"),
    ],
)
def test_check_linear_shape_rejects(K, N, bits, group_size, match):
    with pytest.raises(ValueError, match=match):
        check_linear_shape(K, N, bits, group_size)


@pytest.mark.parametrize(
    "K,N,bits,group_size", [(128, 32, 3, 32), (96, 16, 2, 32), (256, 8, 4, 128), (64, 4, 8, 64)]
)
def test_check_linear_shape_accepts(K, N, bits, group_size):
    check_linear_shape(K, N, bits, group_size)


def test_is_sequential_and_drop():
    seq = make_layer(128, 32, 4, 32).stored
    assert seq.is_sequential and seq.drop_sequential_g_idx().g_idx is None
    assert replace(seq, g_idx=None).is_sequential
    act = make_layer(128, 32, 4, 32, act_order=True).stored
    assert not act.is_sequential and act.drop_sequential_g_idx() is act


def _bad(layer, **change):
    t = layer.stored
    args = dict(
        qweight=t.qweight, qzeros=t.qzeros, scales=t.scales, g_idx=None, bits=4, group_size=32
    )
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(bits=5), ValueError, r"bits=5 .*use one of"),
        (dict(qweight=torch.zeros(16, 64)), TypeError, r"qweight has dtype torch.float32.*int32"),
        (
            dict(qweight=torch.zeros(15, 64, dtype=torch.int32)),
            ValueError,
            r"qweight has shape \(15, 64\).*in_features=120 is not a multiple of group_size=32",
        ),
        (
            dict(qzeros=torch.zeros(4, 4, dtype=torch.int32)),
            ValueError,
            r"qzeros has shape \(4, 4\).*\[4, 8\]",
        ),
        (dict(scales=torch.ones(3, 64, dtype=torch.float16)), ValueError, r"3 groups for K=128"),
        (
            dict(scales=torch.ones(4, 64, dtype=torch.int32)),
            TypeError,
            r"scales has dtype torch.int32",
        ),
        (
            dict(scales=torch.ones(4, 32, dtype=torch.float16)),
            ValueError,
            r"scales has shape \(4, 32\).*N=64",
        ),
        (
            dict(g_idx=torch.zeros(64, dtype=torch.int32)),
            ValueError,
            r"g_idx has shape \(64,\).*\[128\]",
        ),
        (dict(g_idx=torch.zeros(128)), TypeError, r"g_idx has dtype torch.float32"),
        (dict(bits=3), ValueError, r"qweight has shape \(16, 64\): 3-bit"),
        (dict(group_size=48), ValueError, r"group_size=48 is not a multiple of 32"),
        (dict(group_size=256), ValueError, r"in_features=128 is not a multiple of group_size=256"),
        (dict(checkpoint_format="awq"), ValueError, r"checkpoint_format='awq'"),
    ],
)
def test_layer_validation_messages(change, error, match):
    layer = make_layer(128, 64, 4, 32)
    with pytest.raises(error, match=match):
        GPTQLayer(**_bad(layer, **change))


def test_validation_n_not_word_aligned():
    t = make_layer(64, 32, 3, 32).stored
    with pytest.raises(ValueError, match=r"out_features=20 is not a multiple of 32, which 3-bit"):
        GPTQLayer(t.qweight[:, :20], t.qzeros, t.scales[:, :20], None, bits=3, group_size=32)


def test_g_idx_range_is_checked_on_request():
    t = make_layer(64, 32, 4, 32).stored
    bad = replace(t, g_idx=t.g_idx + 10)  # shapes are fine, values are not
    with pytest.raises(ValueError, match=r"g_idx spans \[10, 11\] but there are 2 groups"):
        bad.check_g_idx()


def _packed(bits, fmt, corrupt=None):
    codes, scales, zeros, g_idx = _random_layer(bits, 32, zero_min=1 if fmt == "gptq" else 0)
    t = pack_linear(codes, scales, zeros, g_idx, bits, fmt)
    if corrupt is not None:
        corrupt(t)  # in place: the layer is frozen, its tensors are not
    return t


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize(
    "corrupt,msg",
    [
        (
            lambda t: t.scales.view(-1)[7].fill_(float("nan")),
            r"^L\.scales has 1 NaN/inf value\(s\) of 256: ",
        ),
        (
            lambda t: t.scales.view(-1)[0].fill_(float("-inf")),
            r"^L\.scales has 1 NaN/inf value\(s\)",
        ),
        (
            lambda t: t.g_idx.view(-1)[0].fill_(4),
            r"^L\.g_idx spans \[0, 4\] but there are 4 groups",
        ),
        (
            lambda t: t.g_idx.view(-1)[0].fill_(-1),
            r"^L\.g_idx spans \[-1, 3\] but there are 4 groups",
        ),
    ],
)
def test_check_values_refuses(bits, fmt, corrupt, msg):
    _packed(bits, fmt).check_values("L")  # the intact layer passes
    with pytest.raises(ValueError, match=msg):
        _packed(bits, fmt, corrupt).check_values("L")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_check_values_range_of_zero_points_depends_on_the_format(bits):
    """All-ones qzeros words decode to z = 2**bits - 1 in gptq_v2 (valid) and 2**bits in gptq
    (invalid)."""
    t = _packed(bits, "gptq_v2", lambda t: t.qzeros.fill_(-1))
    t.check_values("L")
    with pytest.raises(
        ValueError, match=rf"^L\.qzeros decodes to zero points in \[{1 << bits}, {1 << bits}\]"
    ):
        replace(t, checkpoint_format="gptq").check_values("L")


def _stored(bits=4, fmt="gptq", **change):
    t = _packed(bits, fmt)
    return {**{n: getattr(t, n) for n in ("qweight", "qzeros", "scales", "g_idx")}, **change}


@pytest.mark.parametrize(
    "stored,shape,msg",
    [
        (_stored(), (128, 64), None),
        (_stored(g_idx=torch.arange(128) // 32), (128, 64), None),  # int64 g_idx (other GPTQ tools)
        (
            _stored(scales=torch.ones(4, 64, dtype=torch.int32)),
            (128, 64),
            r"L: scales has dtype torch\.int32",
        ),
        (
            _stored(qweight=torch.zeros(15, 64, dtype=torch.int32)),
            (128, 64),
            r"L: qweight has shape \(15, 64\)",
        ),
        (
            _stored(qzeros=torch.zeros(4, 7, dtype=torch.int32)),
            (128, 64),
            r"L: qzeros has shape \(4, 7\)",
        ),
        (_stored(g_idx=torch.zeros(128)), (128, 64), r"L: g_idx has dtype torch\.float32"),
        (
            _stored(),
            (128, 96),
            r"L holds a layer with K=128, N=64 at 4 bits, but the model's linear has "
            r"in_features=128, out_features=96",
        ),
        (
            _stored(scales=torch.full((4, 64), float("nan"), dtype=torch.float16)),
            (128, 64),
            r"L\.scales has 256 NaN/inf value\(s\)",
        ),
    ],
)
def test_config_read_layer_checks_the_whole_layer(stored, shape, msg):
    """What both loaders call: construction (shapes, dtypes), the model's shape, then the values."""
    qc = CheckpointQuantConfig(bits=4, group_size=32)
    if msg is None:
        layer = qc.read_layer(stored, "L", *shape)
        assert (layer.K, layer.N, layer.g_idx.dtype) == (*shape, torch.int32)
        return
    with pytest.raises(ValueError, match=r"^corrupt checkpoint: " + msg) as e:
        qc.read_layer(stored, "L", *shape)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("missing", ["bits", "group_size"])
def test_config_without_bits_or_group_size_is_an_error(missing):
    d = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    del d[missing]
    with pytest.raises(ValueError, match=f"quantization_config has no '{missing}'"):
        CheckpointQuantConfig.from_dict(d)


@pytest.mark.parametrize(
    "field,value",
    [("checkpoint_format", "gptq_v2"), ("bits", 3), ("group_size", 32), ("sym", True)],
)
def test_config_must_match_its_recorded_fingerprint(field, value):
    fp = {"checkpoint_format": "gptq", "bits": 4, "group_size": 64, "sym": False, "files": {}}
    CheckpointQuantConfig(bits=4, group_size=64, tsq={"integrity": fp})
    with pytest.raises(
        ValueError, match=f"{field}={value!r} differs from {field}={fp[field]!r} recorded"
    ):
        CheckpointQuantConfig(
            **{"bits": 4, "group_size": 64, field: value, "tsq": {"integrity": fp}}
        )
