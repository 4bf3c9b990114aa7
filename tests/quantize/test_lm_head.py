"""`--quantize-lm-head`: the output head quantized after the decoder stack, on tiny random models.

Oracles: the head's calibration moments against a hook on lm_head's input during a plain forward
pass of the model (independent of the streams' layer-skipping replay), and the checkpoint's
tensors decoded by the layout spec (`reference_weight`, not tsq_vllm.format).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import make_tiny_model, opts_for, quantize_in_memory, single_thread
from tsq_vllm.checkpoint.hf import load_quantized
from tsq_vllm.core.hessian import HessianAccumulator
from tsq_vllm.models import find_decoder_layers
from tsq_vllm.quantize.head import find_head, head_moments
from tsq_vllm.quantize.run import UsageError, run_quantization
from tsq_vllm.quantize.streams import ActivationStreams

from .test_pipeline import read_checkpoint, reference_weight

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tied", "llama", tie_word_embeddings=True)


@pytest.mark.parametrize("with_fp", [False, True], ids=["H", "H+R"])
def test_head_moments_are_those_of_its_real_input(tied, with_fp):
    model = AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32).eval()
    ids = torch.randint(0, 384, (6, 24), generator=torch.Generator().manual_seed(0))
    _, stack = find_decoder_layers(model)
    _, head = find_head(model)
    with torch.no_grad():
        streams = ActivationStreams(
            model, stack, ids, batch_size=4, device=torch.device("cpu"), with_fp=with_fp
        )
        for i, layer in enumerate(stack):  # nothing quantized: both streams stay full precision
            streams.begin_layer(i, layer)
            streams.end_layer()
        m = head_moments(model, stack, head, ids, streams, batch_size=4)
        acc = HessianAccumulator(head.in_features, with_r=False)
        hook = head.register_forward_pre_hook(lambda _m, a: acc.add(a[0], None))
        model(input_ids=ids, use_cache=False)
        hook.remove()
    H, _ = acc.finalize()
    torch.testing.assert_close(m.H, H, rtol=1e-5, atol=1e-6)
    if with_fp:
        assert m.R is not None and float(m.R.abs().max()) <= 1e-6 * float(H.abs().max())


@pytest.mark.parametrize("bits,fmt", [(4, "gptq"), (3, "gptq_v2")])
def test_tied_head_is_untied_packed_and_reloaded(tied, tmp_path, bits, fmt):
    out = tmp_path / "ck"
    opts = opts_for(tied, out, bits=bits, checkpoint_format=fmt, quantize_lm_head=True)
    run_quantization(opts)
    t = read_checkpoint(out)
    assert "lm_head.weight" not in t and "lm_head.qweight" in t
    src = AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32)
    # The embedding is stored separately, unquantized, bit for bit the source's.
    assert torch.equal(t["model.embed_tokens.weight"], src.model.embed_tokens.weight)
    w = reference_weight(t, "lm_head", bits, fmt)
    assert w.shape == src.lm_head.weight.shape
    assert not torch.equal(w, src.lm_head.weight)  # quantized, not copied
    rel = (w - src.lm_head.weight).norm() / src.lm_head.weight.norm()
    assert rel < {4: 0.2, 3: 0.4}[bits], rel
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    for qc in (
        config["quantization_config"],
        json.loads((out / "quantize_config.json").read_text()),
    ):
        assert qc["lm_head"] is True
    model = load_quantized(out)
    assert type(model.lm_head).__name__ == "QuantLinear"
    torch.testing.assert_close(model.lm_head.dequantized_weight(), w)
    ids = torch.randint(0, 384, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, quantize_in_memory(opts)[0](ids).logits)


def test_without_the_flag_the_head_stays_tied_and_unquantized(tied, tmp_path):
    out = tmp_path / "ck"
    run_quantization(opts_for(tied, out, bits=4))
    t = read_checkpoint(out)
    assert not any(k.startswith("lm_head.") for k in t)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["quantization_config"]["lm_head"] is False


def test_unstorable_head_shape_is_refused_before_loading(tmp_path):
    src = make_tiny_model(tmp_path / "v", "llama", vocab_size=392)  # 392 % 32 != 0
    with pytest.raises(UsageError, match=r"--quantize-lm-head: lm_head: .*392"):
        run_quantization(opts_for(src, tmp_path / "ck", bits=3, quantize_lm_head=True))
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("method,fmt", [("tsq", "gptq"), ("gptqt", "gptq")])
def test_row_blocks_write_the_same_checkpoint(tied, tmp_path, monkeypatch, method, fmt):
    """Blocks of 64 rows (the head's 384 rows in six, and the wider decoder linears too): the
    pipeline announces one read of each input per block and writes the unblocked bytes."""
    from tsq_vllm.quantize import row_blocks

    # GPTQT's lm_head is written as its b0-bit GPTQ reading (BCQ serving has no quantized head).
    kw = dict(bits=3, method=method, checkpoint_format=fmt, quantize_lm_head=True)
    run_quantization(opts_for(tied, tmp_path / "whole", **kw))
    src = AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32)
    K = src.lm_head.in_features
    monkeypatch.setattr(row_blocks, "BLOCK_ELEMENTS", 64 * K)
    assert len(row_blocks.row_blocks(*src.lm_head.weight.shape)) == 6
    run_quantization(opts_for(tied, tmp_path / "blocked", **kw))
    whole, blocked = read_checkpoint(tmp_path / "whole"), read_checkpoint(tmp_path / "blocked")
    assert whole.keys() == blocked.keys() and any(k.startswith("lm_head.") for k in whole)
    for k in whole:
        assert torch.equal(whole[k], blocked[k]), k
