"""GPTQT end to end: the CLI's method flags, the layer dispatch, BCQ and GPTQ checkpoints.

The oracle (issue 14): GPTQT's levels lie on the b0-bit integer axis, so the same run written
with `--checkpoint-format gptq` is a plain b0-bit GPTQ checkpoint whose codes take at most 2^k
values per (group, output channel) and whose decode equals the BCQ checkpoint's, up to the fp16
rounding of the BCQ coefficients. Both decodes here are written from docs/format.md with numpy
(`unpack_stream` of test_pipeline.py), not through tsq_vllm.format.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tsq_vllm
from tests.core.conftest import correlated_inputs
from tests.helpers import opts_for, quantize_in_memory, single_thread
from tsq_vllm.quantize.__main__ import main
from tsq_vllm.quantize.gptqt_layer import GPTQTWeight
from tsq_vllm.quantize.layer import prepare_input
from tsq_vllm.quantize.method import quantize_linear
from tsq_vllm.quantize.options import QuantizeOptions
from tsq_vllm.quantize.run import run_quantization
from tsq_vllm.quantize.scheme import LayerScheme

from .test_pipeline import read_checkpoint, reference_weight, unpack_stream

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def bcq_weight(t: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] from the BCQ tensors by the layout spec, and Σ|a_i| + |o| per element [N, K]."""
    words = t[f"{prefix}.bcq_bits"].numpy()  # [k, K/32, N]
    alpha = t[f"{prefix}.bcq_alpha"].double()  # [k, n_g, N]
    offset = t[f"{prefix}.bcq_offset"].double()  # [n_g, N]
    k, n_words, N = words.shape
    K = n_words * 32
    g = (
        t[f"{prefix}.g_idx"].long()
        if f"{prefix}.g_idx" in t
        else torch.arange(K) // (K // offset.shape[0])
    )
    signs = torch.from_numpy(np.stack([unpack_stream(words[i], 1, K) for i in range(k)])) * 2 - 1
    w = (alpha[:, g] * signs.double()).sum(0) + offset[g]  # [K, N]
    size = alpha[:, g].abs().sum(0) + offset[g].abs()
    return w.t(), size.t()


def _bits_on_disk(t: dict[str, torch.Tensor], prefixes: list[str]) -> float:
    n_weights = sum(
        t[f"{p}.bcq_bits"].shape[1] * 32 * t[f"{p}.bcq_bits"].shape[2] for p in prefixes
    )
    nbytes = sum(
        v.numel() * v.element_size()
        for key, v in t.items()
        if key.rpartition(".")[0] in prefixes and not key.endswith(".bias")
    )
    return 8 * nbytes / n_weights


CASES = [
    ("llama", dict(bits=3, group_size=32)),
    ("qwen2", dict(bits=2, group_size=64, intermediate_bits=5, act_order=True)),
    ("mistral", dict(bits=3, group_size=32, reexplore=False, requantize=False)),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_bcq_checkpoint_end_to_end(models, tmp_path, name, kw):
    opts = opts_for(models[name], tmp_path / "out", method="gptqt", **kw)
    job = run_quantization(opts)
    quantized, _ = quantize_in_memory(opts)  # the streamed run releases its layers
    t = read_checkpoint(job.output)
    prefixes = sorted(k[: -len(".bcq_bits")] for k in t if k.endswith(".bcq_bits"))
    assert len(prefixes) == 14 and not any(k.endswith(".qweight") for k in t)
    qc = json.loads((job.output / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["checkpoint_format"], qc["bits"]) == ("tsq", "bcq", kw["bits"])
    assert qc["tsq"]["method"] == "gptqt"
    assert qc["tsq"]["gptqt"]["intermediate_bits"] == kw.get("intermediate_bits", 4)
    k, G = kw["bits"], kw["group_size"]
    for prefix in prefixes:
        assert (
            t[f"{prefix}.bcq_bits"].shape[0] == k
            and t[f"{prefix}.bcq_alpha"].dtype == torch.float16
        )
        assert (f"{prefix}.g_idx" in t) == bool(kw.get("act_order"))
        W, size = bcq_weight(t, prefix)
        in_memory = quantized.get_submodule(prefix).weight.double()  # the b0-bit reading
        assert ((W - in_memory).abs() <= 2**-11 * (size + in_memory.abs()) + 1e-6).all()
    # k planes + fp16 alpha (k) and offset per group, and int32 g_idx with act-order.
    shapes = [(t[f"{p}.bcq_bits"].shape[1] * 32, t[f"{p}.bcq_bits"].shape[2]) for p in prefixes]
    act = bool(kw.get("act_order"))
    expected = sum(k * K * N + 16 * (k + 1) * K // G * N + 32 * K * act for K, N in shapes)
    assert _bits_on_disk(t, prefixes) == pytest.approx(expected / sum(K * N for K, N in shapes))
    reloaded = tsq_vllm.load_quantized(job.output)
    assert type(reloaded.get_submodule(prefixes[0])).__name__ == "BCQLinear"
    ids = torch.randint(0, 384, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = reloaded(input_ids=ids).logits, quantized(input_ids=ids).logits
    # The reload serves the BCQ decode: the fp16 rounding of its coefficients, nothing more.
    assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()
    decoded = reloaded.get_submodule(prefixes[0]).dequantized_weight().double()
    torch.testing.assert_close(decoded, bcq_weight(t, prefixes[0])[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("k,act_order", [(3, False), (2, True)])
def test_gptq_export_is_the_same_weights_as_bcq(models, tmp_path, k, act_order):
    kw = dict(method="gptqt", bits=k, group_size=32, act_order=act_order)
    bcq = run_quantization(opts_for(models["llama"], tmp_path / "bcq", **kw))
    gptq = run_quantization(
        opts_for(models["llama"], tmp_path / "gptq", checkpoint_format="gptq", **kw)
    )
    qc = json.loads((gptq.output / "config.json").read_text())["quantization_config"]
    assert (qc["checkpoint_format"], qc["bits"], qc["tsq"]["gptqt"]["bits"]) == ("gptq", 4, k)
    tb, tg = read_checkpoint(bcq.output), read_checkpoint(gptq.output)
    prefixes = sorted(p[: -len(".qweight")] for p in tg if p.endswith(".qweight"))
    assert len(prefixes) == 14
    for prefix in prefixes:
        g_idx = tg[f"{prefix}.g_idx"].long()
        codes = torch.from_numpy(unpack_stream(tg[f"{prefix}.qweight"].numpy(), 4, g_idx.numel()))
        for g in range(int(g_idx.max()) + 1):  # at most 2^k codes per (group, output channel)
            block = codes[g_idx == g]  # [G, N]
            distinct = (block[:, None, :] == torch.arange(16)[None, :, None]).any(0).sum(0)
            assert int(distinct.max()) <= 2**k
        W_gptq = reference_weight(tg, prefix, 4, "gptq").double()
        W_bcq, size = bcq_weight(tb, prefix)
        scales = tg[f"{prefix}.scales"].double()[g_idx].t()  # [N, K]
        # fp16 rounding of a_i and o moves each term by at most 2^-11 of it.
        bound = 2**-11 * (size + W_gptq.abs()) + 1e-6
        assert ((W_bcq - W_gptq).abs() <= bound).all(), prefix
        assert (scales > 0).all()


def test_layer_dispatch_and_reexploration(tmp_path):
    g = torch.Generator().manual_seed(1)
    X = correlated_inputs(128, 512)
    W, H = torch.randn(48, 128, generator=g), X.t() @ X / 512
    base = dict(bits=3, group_size=32, method="gptqt", intermediate_bits=4)
    qw = quantize_linear(W, prepare_input(H, LayerScheme(**base)))
    plain = quantize_linear(W, prepare_input(H, LayerScheme(**base, reexplore=False)))
    assert isinstance(qw, GPTQTWeight) and isinstance(plain, GPTQTWeight)
    assert qw.stats["loss"] <= plain.stats["loss"] * (1 + 1e-6)
    tsq = quantize_linear(W, prepare_input(H, LayerScheme(bits=3, group_size=32)))
    assert type(tsq).__name__ == "QuantizedWeight"
    packed = qw.pack("bcq")
    w_bcq, w = packed.dequantize(torch.float32).t().double(), qw.dequantize().double()
    size = packed.bcq_alpha.double().abs().sum(0) + packed.bcq_offset.double().abs()  # [n_g, N]
    bound = 2**-11 * (size.repeat_interleave(32, 0).t() + w.abs()) + 1e-7
    assert ((w_bcq - w).abs() <= bound).all()
    for block in qw.codes.reshape(48 * 4, 32):  # at most 2^k codes per (row, group)
        assert block.unique().numel() <= 8
    with pytest.raises(ValueError, match="tsq writes one of"):
        tsq.pack("bcq")


BAD = [
    (["--method", "gptqt", "--bits", "4"], "--bits 4 is not supported with --method gptqt"),
    (["--intermediate-bits", "5"], "--intermediate-bits applies to --method gptqt only"),
    (["--no-reexplore"], "--no-reexplore applies to --method gptqt only"),
    (["--checkpoint-format", "bcq"], "--checkpoint-format bcq stores binary coding"),
    (
        ["--method", "gptqt", "--intermediate-bits", "5", "--checkpoint-format", "gptq"],
        "cannot hold --intermediate-bits 5 codes",
    ),
    (["--method", "gptqt", "--intermediate-bits", "6"], "--intermediate-bits 6 is not supported"),
    (["--method", "gptqt", "--no-gptq"], "--no-gptq (round to nearest) is a tsq baseline"),
    (["--method", "gptq"], "--method 'gptq' is not supported"),
    (["--method", "gptqt", "--refine-block", "5"], "--refine-block 5 applies to --method tsq"),
    (
        ["--method", "gptqt", "--quantize-lm-head"],
        "--quantize-lm-head with --checkpoint-format bcq is not supported",
    ),
]


@pytest.mark.parametrize("argv,text", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_invalid_combinations_are_one_line(tmp_path, capsys, argv, text):
    assert main([*argv, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and text in err, err
    assert not (tmp_path / "o").exists()


def test_defaults_resolve_the_format():
    assert QuantizeOptions(output="x").checkpoint_format == "gptq"
    o = QuantizeOptions(output="x", method="gptqt", bits=2)
    assert (o.checkpoint_format, o.stored_bits, o.zero_min) == ("bcq", 2, 1)
    assert QuantizeOptions(output="x", method="gptqt", checkpoint_format="gptq").stored_bits == 4


@pytest.mark.parametrize("gptaq_alpha", [0.0, 0.25])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_gptqt_with_the_shared_factor_is_bit_identical_to_the_old_code(
    monkeypatch, gptaq_alpha, act_order, precision
):
    """Both GPTQ passes on the input's one factorization (the second reuses a float64 U) give
    what the code that factorized Hd per pass gave."""
    from tests.core.factor_oracle import use_old_factorizations
    from tsq_vllm.quantize.gptqt_layer import quantize_weight_gptqt

    from .test_layer import _streams

    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    H, R = _streams(K=128, T=1024, noise=0.5, seed=2)
    s = LayerScheme(
        bits=2,
        group_size=32,
        method="gptqt",
        act_order=act_order,
        gptaq_alpha=gptaq_alpha,
        precision=precision,
    )
    new = quantize_weight_gptqt(W, H, s, R=R)
    with monkeypatch.context() as m:
        use_old_factorizations(m)
        old = quantize_weight_gptqt(W, H, s, R=R)
    for f in ("codes", "scale", "zero", "low", "steps", "signs"):
        assert torch.equal(getattr(new.bcq, f), getattr(old.bcq, f)), f
    assert torch.equal(new.perm, old.perm)
    keep = [k for k in new.stats if not k.startswith("time_")]
    assert {k: new.stats[k] for k in keep} == {k: old.stats[k] for k in keep}
