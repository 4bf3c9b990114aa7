"""A quantized lm_head in vLLM (`lm_head: true`): a real `ParallelLMHead` with the tsq method,
loaded through its vocabulary shards, against the reference decode."""

from __future__ import annotations

import pytest
import torch

from tsq_vllm.format import pack_linear

from .conftest import rtn_quantize
from .test_plugin import _config, fake_tp, vllm_ctx  # noqa: F401  (vllm_ctx is a fixture)

vllm = pytest.importorskip("vllm")

HIDDEN = 128


def _head(vocab: int, cfg, dtype: torch.dtype):
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    return ParallelLMHead(vocab, HIDDEN, quant_config=cfg, params_dtype=dtype, prefix="lm_head")


def _packed_head(vocab: int, bits: int, group: int):
    w = torch.randn(vocab, HIDDEN, generator=torch.Generator().manual_seed(0)) * 0.05
    t = pack_linear(*rtn_quantize(w, bits, group, act_order=False), bits)
    return t, t.dequantize(dtype=torch.float32)


def _logits(head, x: torch.Tensor) -> torch.Tensor:
    """What vLLM's LogitsProcessor computes from the head (before its gather and slice)."""
    return head.quant_method.apply(head, x)


# vocab 352 is padded to 384 by vLLM (a multiple of 64): the padding columns must decode to 0.
@pytest.mark.parametrize(
    "bits,group,vocab,tp,dtype",
    [
        (4, 64, 384, 1, torch.float32),
        (3, 32, 352, 1, torch.float32),
        (4, 64, 352, 2, torch.float32),
        (2, 64, 352, 1, torch.bfloat16),
        (8, 32, 384, 2, torch.bfloat16),
    ],
)
def test_quantized_head_matches_reference(vllm_ctx, bits, group, vocab, tp, dtype):  # noqa: F811
    from tsq_vllm.serve.linear import TsqLinearMethod

    t, w = _packed_head(vocab, bits, group)
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = x.float() @ w
    pieces = []
    for rank in range(tp):
        with fake_tp(rank, tp):
            head = _head(vocab, _config(bits, group, lm_head=True), dtype)
            assert isinstance(head.quant_method, TsqLinearMethod)
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                param = getattr(head, name)
                param.weight_loader(param, getattr(t, name))
            head.quant_method.process_weights_after_loading(head)
            y = _logits(head, x).float()
        idx = head.shard_indices
        size = idx.org_vocab_end_index - idx.org_vocab_start_index
        assert y.shape == (3, head.num_embeddings_per_partition)
        assert bool((y[:, size:] == 0).all())  # vLLM's vocabulary padding
        pieces.append(y[:, :size])
    got = torch.cat(pieces, dim=1)
    tol = 1e-5 if dtype == torch.float32 else 0.02
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_unquantized_head_keeps_vllms_method(vllm_ctx):  # noqa: F811
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    head = _head(384, _config(4, 64), torch.float32)
    assert isinstance(head.quant_method, UnquantizedEmbeddingMethod)


@pytest.mark.parametrize(
    "lm_head,modules,needle",
    [
        (True, {"model.layers.0.mlp.down_proj"}, "no lm_head.qweight: set lm_head to false"),
        (False, {"lm_head"}, 'lm_head=false: set "lm_head": true'),
    ],
)
def test_config_and_tensors_must_agree_on_the_head(vllm_ctx, lm_head, modules, needle):  # noqa: F811
    cfg = _config(4, 64, lm_head=lm_head)
    cfg.quantized_modules = modules
    with pytest.raises(ValueError, match=needle):
        _head(384, cfg, torch.float32)


def test_head_shard_of_the_wrong_vocabulary_is_refused(vllm_ctx):  # noqa: F811
    t, _ = _packed_head(320, 4, 64)
    head = _head(384, _config(4, 64, lm_head=True), torch.float32)
    with pytest.raises(
        ValueError, match=r"lm_head\.scales: checkpoint tensor has shape \(2, 320\)"
    ):
        head.scales.weight_loader(head.scales, t.scales)
