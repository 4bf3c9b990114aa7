"""A wide linear quantized in row blocks gives what the whole-weight path gives."""

import pytest
import torch

from tsq_vllm.quantize import LayerScheme
from tsq_vllm.quantize import row_blocks as rb
from tsq_vllm.quantize.gptqt_layer import GPTQTWeight
from tsq_vllm.quantize.layer import prepare_input
from tsq_vllm.quantize.method import quantize_linear

from ..core.test_stage2 import _moments, _samples

ROWS, K = 64, 128
N = 3 * ROWS + 17  # three full blocks and a short one

SCHEMES = {
    "tsq": dict(),  # the default: stage 1, GPTAQ, GPTQ, stage 2 with R and its box
    "gptq": dict(stage1=False, stage2=False, gptaq_alpha=0.0),
    "rtn": dict(gptq=False, stage2=False),
    "act_order": dict(act_order=True),
    "energy_match": dict(energy_match=True, precision="float32"),
    "gptqt": dict(method="gptqt", intermediate_bits=4),
    "gptqt-plain": dict(method="gptqt", requantize=False, reexplore=False, precision="float32"),
}


def _quantize(W, H, R, D, scheme):
    inp = prepare_input(H, scheme, R, D, readers=len(rb.row_blocks(*W.shape)))
    qw = quantize_linear(W, inp)
    # One announced read per block: the factorizations are gone after the last one.
    assert inp.factor._L is None and inp.factor._U is None
    return qw


def _tensors(qw) -> dict[str, torch.Tensor]:
    """Every tensor that decides what is written."""
    if isinstance(qw, GPTQTWeight):
        fields = ("codes", "scale", "zero", "low", "steps", "signs")
        return {"perm": qw.perm} | {f: getattr(qw.bcq, f) for f in fields}
    return {f: getattr(qw, f) for f in ("codes", "scales", "zeros", "grid_scales", "g_idx")}


def _layer(seed: int):
    X, Xt = _samples(K=K, T=1024, noise=0.5, seed=seed)
    H, R, D = (m.float() for m in _moments(X, Xt))
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    W[5] = 0  # an all-zero row: its groups keep unit scales in every block layout
    return W, H, R, D


# Moments given: H, R and D (the pipeline's default), H and R (no true eq. (7)), H alone.
MOMENTS = ("HRD", "HR", "H")
CASES = [(n, m) for n in SCHEMES for m in MOMENTS if not ("energy_match" in n and m == "HR")]


@pytest.mark.parametrize("name,moments", CASES)
def test_row_blocks_give_the_whole_weight_result(monkeypatch, name, moments):
    W, H, R, D = _layer(seed=3)
    R = R if "R" in moments else None
    D = D if "D" in moments else None
    with_d = R is None or D is not None
    scheme = LayerScheme(bits=3, group_size=32, **SCHEMES[name])
    whole = _quantize(W, H, R, D, scheme)
    monkeypatch.setattr(rb, "BLOCK_ELEMENTS", ROWS * K)
    assert [b.stop - b.start for b in rb.row_blocks(N, K)] == [ROWS] * 3 + [17]
    blocked = _quantize(W, H, R, D, scheme)

    # Every step is per row and stage 2 sweeps all rows at once: the codes and scales are the
    # same bits (on this CPU the row-block GEMMs round as the whole-weight ones do).
    a, b = _tensors(blocked), _tensors(whole)
    assert a.keys() == b.keys()
    for f in a:
        assert torch.equal(a[f], b[f]), f
    assert torch.equal(blocked.dequantize(), whole.dequantize())
    # The stats add float sums over the blocks: equal up to their rounding.
    assert blocked.stats.keys() == whole.stats.keys()
    assert ("rel_error" in whole.stats) == (with_d and "gptqt" not in name)  # GPTQT logs none
    for k, v in whole.stats.items():
        if not k.startswith("time_"):
            assert blocked.stats[k] == pytest.approx(v, rel=1e-5, abs=1e-12), k


def test_a_small_linear_is_one_block_and_a_head_is_several():
    assert rb.row_blocks(4096, 4096) == [slice(0, 4096)]
    assert len(rb.row_blocks(14336, 4096)) == 1  # Llama-3-8B's gate/up: the unblocked path
    blocks = rb.row_blocks(151936, 1536)  # Qwen2.5-1.5B's lm_head
    assert len(blocks) > 1 and blocks[0].start == 0 and blocks[-1].stop == 151936
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:], strict=False))
    assert all((b.stop - b.start) * 1536 * 4 <= 256 * 2**20 for b in blocks)
