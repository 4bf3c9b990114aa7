"""`--refine-block` through the whole pipeline, on tiny random models.

The block loss is checked against an independent oracle: transformers' own forward pass of the
in-memory quantized model, whose first decoder layer's output is compared with the FP model's on
the calibration windows (both streams start from the same embeddings, so for layer 0 that is
exactly the loss the refinement minimizes).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.helpers import opts_for, single_thread
from tsq_vllm.quantize import pipeline
from tsq_vllm.quantize.pipeline import quantize_model

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

LAYER0 = "model.layers.0."


def _windows(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 384, (8, 32), generator=torch.Generator().manual_seed(seed))


def _quantize(src, tmp_path, **kw):
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    opts = opts_for(src, tmp_path / "unused", bits=3, group_size=32, **kw)
    return model, quantize_model(model, _windows(), opts)


def _layer0_mse(model, fp) -> float:
    """Mean squared error of decoder layer 0's output against the FP model's, per window batch
    of 4 as the pipeline ran them."""
    sse, n = 0.0, 0
    with torch.no_grad():
        for ids in _windows().split(4):
            q = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
            f = fp(input_ids=ids, output_hidden_states=True).hidden_states[1]
            sse, n = sse + float((q - f).square().sum()), n + q.numel()
    return sse / n


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_refined_block_loss_is_lower_and_is_the_real_block_loss(models, tmp_path, arch):
    src = models[arch]
    fp = AutoModelForCausalLM.from_pretrained(src).eval()
    base_model, base = _quantize(src, tmp_path, refine_block=0)
    model, res = _quantize(src, tmp_path, refine_block=30, refine_lr=1e-2)
    stats = res.stats[LAYER0 + "self_attn.q_proj"]
    assert stats["refine_loss_start"] == pytest.approx(_layer0_mse(base_model, fp), rel=1e-4)
    assert stats["refine_loss"] == pytest.approx(_layer0_mse(model, fp), rel=1e-4)
    assert stats["refine_loss"] < stats["refine_loss_start"]
    for name, s in res.stats.items():
        assert s["refine_loss"] <= s["refine_loss_start"], name
        assert "refine_loss" not in base.stats[name]


def test_codes_and_zeros_stay_and_scales_move_within_the_box(models, tmp_path):
    """Layer 0 sees the same inputs with and without refinement, so its codes, zeros and start
    scales are those of the unrefined run; without stage 2 the start is the grid itself, the
    centre of the box [s0/B, B·s0]. A narrow box and large steps drive many scales onto its
    edges."""
    src, box = models["llama"], 1.05
    flags = dict(stage2=False, gptaq_alpha=0.0, scale_box=box)
    _, base = _quantize(src, tmp_path, refine_block=0, **flags)
    _, res = _quantize(src, tmp_path, refine_block=20, refine_lr=0.05, **flags)
    layer0 = [n for n in res.packed if n.startswith(LAYER0)]
    assert len(layer0) == 7
    ratios = []
    for name in layer0:
        a, b = base.packed[name], res.packed[name]
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.qzeros, b.qzeros), name
        assert torch.equal(a.g_idx, b.g_idx)
        assert bool((b.scales > 0).all())
        ratios.append((b.scales.float() / a.scales.float()).flatten())
    r = torch.cat(ratios)
    tol = 2e-3  # fp16 rounding of the refined scale
    assert bool((r >= 1 / box - tol).all()) and bool((r <= box + tol).all())
    assert float((r - 1).abs().max()) > 0.03  # the scales did move
    at_edge = ((r - box).abs() < tol) | ((r - 1 / box).abs() < tol)
    assert float(at_edge.float().mean()) > 0.05


def test_same_seed_gives_identical_tensors(models, tmp_path):
    src = models["llama"]
    runs = [_quantize(src, tmp_path, refine_block=6, seed=3)[1] for _ in range(2)]
    assert runs[0].packed.keys() == runs[1].packed.keys()
    for name, a in runs[0].packed.items():
        b = runs[1].packed[name]
        for f in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (name, f)


def test_refine_off_never_runs_the_refinement(models, tmp_path, monkeypatch):
    """0 leaves the pipeline as it was: no refinement, and no FP stream it alone would need."""

    def boom(*_a, **_k):
        raise AssertionError("refine_block ran with --refine-block 0")

    monkeypatch.setattr(pipeline, "refine_block", boom)
    _quantize(models["llama"], tmp_path, refine_block=0)
    assert not opts_for(models["llama"], tmp_path, stage2=False, gptaq_alpha=0.0).error_feedback
    kept = opts_for(models["llama"], tmp_path, stage2=False, gptaq_alpha=0.0, refine_block=2)
    assert kept.error_feedback


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(refine_block=-1), "--refine-block -1 must be 0 (off) or a positive number"),
        (dict(refine_block=5, refine_lr=0.0), "--refine-lr 0.0 must lie in (0, 1]"),
        (dict(refine_block=5, refine_lr=2.0), "--refine-lr 2.0 must lie in (0, 1]"),
        (
            dict(refine_block=5, error_feedback=False),
            "--refine-block 5 needs the full-precision stream",
        ),
    ],
)
def test_bad_refine_settings_are_refused_in_one_line(models, tmp_path, kw, message):
    with pytest.raises(ValueError) as e:
        opts_for(models["llama"], tmp_path, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bf16_model_refines_without_raising_the_block_loss(models, tmp_path):
    model, res = _quantize(models["qwen2-bf16"], tmp_path, refine_block=8, refine_lr=1e-2)
    for name, s in res.stats.items():
        assert s["refine_loss"] <= s["refine_loss_start"], name
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(bool((p.scales > 0).all()) for p in res.packed.values())
