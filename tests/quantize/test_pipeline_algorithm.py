"""What the quantization pipeline computes, on tiny random models: the run record in the
config, the ablation switches, stage-2 losses, scale signs, the grouping of linears by shared
input, the Hessians of the quantized and full-precision streams, and the memory-bounded fallback.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tsq_vllm
from tests.helpers import linear_prefixes, make_config, make_tiny_model, opts_for, single_thread
from tsq_vllm.quantize.run import run_quantization

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def test_tsq_block_records_the_run(models, tmp_path):
    src = models["llama"]
    out = run_quantization(
        opts_for(src, tmp_path / "o", bits=4, group_size=32, seed=7, damp=0.02)
    ).output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {
        k: qc[k]
        for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")
    } == {
        "quant_method": "tsq",
        "bits": 4,
        "group_size": 32,
        "sym": False,
        "desc_act": False,
        "checkpoint_format": "gptq",
    }
    assert qc["damp_percent"] == 0.02
    tsq = qc["tsq"]
    assert tsq["stage1"] is True and tsq["stage2"] is True and tsq["error_feedback"] is True
    assert tsq["scale_search"] == "hessian" and tsq["version"] == tsq_vllm.__version__
    assert tsq["calibration"] == {
        "dataset": f"text:{src}/calib.txt",
        "nsamples": 8,
        "seqlen": 64,
        "seed": 7,
    }


def test_ablation_switches_change_the_checkpoint(models, tmp_path):
    src = models["llama"]
    runs = {
        "full": {},
        "no_stage2": dict(stage2=False, gptaq_alpha=0.0),
        "no_stage2_gptaq": dict(stage2=False),
        "no_r": dict(error_feedback=False),
        "no_stage1": dict(stage1=False, stage2=False),
        "rtn": dict(stage1=False, stage2=False, gptq=False),
    }
    t = {}
    for name, kw in runs.items():
        out = run_quantization(opts_for(src, tmp_path / name, **kw)).output
        t[name] = (
            load_file(out / "model.safetensors"),
            json.loads((out / "config.json").read_text())["quantization_config"]["tsq"],
        )
    full, _ = t["full"]
    prefixes = linear_prefixes(full)

    def differs(a, b, leaf):
        return [p for p in prefixes if not torch.equal(a[f"{p}.{leaf}"], b[f"{p}.{leaf}"])]

    # Stage 2 moves only the scales, so the first group (same H, same grid) keeps its codes; later
    # groups see other activations and get other codes. Every linear's scales change.
    first = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    no2, tsq = t["no_stage2"]
    assert not set(first) & set(differs(full, no2, "qweight"))
    assert differs(full, no2, "scales") == prefixes
    assert tsq["stage2"] is False and tsq["error_feedback"] is False
    # GPTAQ (on by default) still needs the FP stream without stage 2, and changes later codes.
    no2_gq, tsq = t["no_stage2_gptaq"]
    assert tsq["error_feedback"] is True and tsq["gptaq_alpha"] > 0
    assert not set(first) & set(differs(no2, no2_gq, "qweight"))  # R = 0 in layer 0's q/k/v
    assert "model.layers.1.mlp.down_proj" in differs(no2, no2_gq, "qweight")
    # R is zero for the first layer's q/k/v (both streams are the embeddings), nonzero after.
    no_r, tsq = t["no_r"]
    changed = differs(full, no_r, "scales")
    assert (
        "model.layers.0.self_attn.q_proj" not in changed
        and "model.layers.1.mlp.down_proj" in changed
    )
    assert tsq["error_feedback"] is False
    no1, tsq = t["no_stage1"]
    assert differs(no2, no1, "scales") and tsq["scale_search"] == "minmax"
    rtn, tsq = t["rtn"]
    assert differs(no1, rtn, "qweight") and tsq["gptq"] is False


def test_stage2_lowers_every_logged_loss(models, tmp_path):
    job = run_quantization(opts_for(models["qwen2"], tmp_path / "o"))
    for name, st in job.result.stats.items():
        assert st["loss"] <= st["loss_gptq"] + 1e-6 * abs(st["loss_gptq"]), name
        assert {"time_grid", "time_gptq", "time_stage2"} <= set(st)


def test_default_options_write_no_negative_scale(tmp_path):
    """Few calibration tokens make the paper's unbounded stage 2 flip signs; the default box
    prevents it."""
    src = make_tiny_model(tmp_path / "m", "llama", layers=4)
    paper = dict(error_feedback_alpha=1.0, gptaq_alpha=0.0)
    negatives = {}
    for name, kw in {
        "default": {},
        "paper, boxed": paper,
        "paper": dict(paper, scale_box=0.0),
    }.items():
        out = run_quantization(
            opts_for(src, tmp_path / name, bits=2, group_size=32, nsamples=2, seqlen=16, **kw)
        ).output
        t = load_file(out / "model.safetensors")
        scales = [v.float() for k, v in t.items() if k.endswith(".scales")]
        negatives[name] = sum(int((s <= 0).sum()) for s in scales)
    assert negatives["default"] == negatives["paper, boxed"] == 0
    assert negatives["paper"] > 0  # the case is one where the box matters


@pytest.mark.parametrize("boxed", [True, False], ids=["boxed", "unbounded"])
def test_negative_scales_refused_unless_the_ablation_asked_for_them(boxed, caplog):
    from tsq_vllm.quantize.pipeline import _check_positive

    scales = torch.tensor([[0.5, -0.25], [0.0, 1.0]])
    _check_positive("l", scales.abs(), boxed=boxed)  # positive (and an fp16-underflow 0): accepted
    if boxed:
        with pytest.raises(
            ValueError, match=r"^l: 1 of 4 scales are negative although stage 2 kept them"
        ):
            _check_positive("l", scales, boxed=True)
    else:
        with caplog.at_level("WARNING", logger="tsq_vllm.quantize"):
            _check_positive("l", scales, boxed=False)
        assert "1 of 4 scales are negative (--scale-box 0" in caplog.text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_linears_grouped_by_shared_input_in_execution_order(models, arch):
    from transformers import AutoModelForCausalLM

    from tsq_vllm.quantize.streams import _record_layer_calls, input_groups

    model = AutoModelForCausalLM.from_pretrained(models[arch]).eval()
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, calls = _record_layer_calls(model, model.model.layers, ids, 2, torch.device("cpu"))
        groups = input_groups(model.model.layers[1], hidden[0], calls[1][0])
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def _gemma3_sliding_then_full():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = make_config(
        "gemma3",
        tie_word_embeddings=True,  # Gemma 3's default
        head_dim=32,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def _llama(models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(models["llama"]).eval()


@pytest.mark.parametrize(
    "build", [_llama, lambda models: _gemma3_sliding_then_full()], ids=["llama", "gemma3"]
)
def test_hessians_come_from_the_quantized_and_fp_streams(models, monkeypatch, build):
    """H and R of every linear equal E[X Xᵀ] and E[(X − X̃) Xᵀ] recomputed from whole-model runs
    (for down_proj, narrow against its input, the per-linear terms W R and wᵀDw instead).

    In the final quantized model, a linear's input depends only on linears that ran before it, all
    of which the pipeline had quantized by then: its inputs there are the quantized stream X. The
    untouched source model gives the full-precision stream X̃. Gemma 3 with a sliding-window layer
    before a full-attention one checks that every layer gets its own attention mask.
    """
    from tsq_vllm.quantize import pipeline

    seen = []
    real = pipeline.quantize_linear

    def spy(W, inp):
        inv = torch.argsort(inp.perm)  # the moments as accumulated, before act-order
        moments = tuple(
            None if M is None else M[inv][:, inv].clone() for M in (inp.H, inp.R, inp.D)
        )
        seen.append((*moments, inp.feedback, W.detach().double().clone()))
        return real(W, inp)

    monkeypatch.setattr(pipeline, "quantize_linear", spy)
    fp, model = build(models), build(models)
    ids = torch.randint(0, 384, (8, 32), generator=torch.Generator().manual_seed(0))
    result = pipeline.quantize_model(
        model, ids, opts_for(models["llama"], models["llama"] / "unused")
    )
    names = list(result.packed)  # in the order the pipeline quantized them

    def linear_inputs(m):
        xs = {}
        hooks = [
            m.get_submodule(n).register_forward_pre_hook(
                lambda _m, a, n=n: xs.__setitem__(
                    n, a[0].reshape(-1, a[0].shape[-1]).double()
                )  # [T, K]
            )
            for n in names
        ]
        with torch.no_grad():
            m(input_ids=ids)
        for h in hooks:
            h.remove()
        return xs

    xq, xf = linear_inputs(model), linear_inputs(fp)
    assert len(seen) == len(names) == 14
    per_linear = []
    for name, (H, R, D, fb, W) in zip(names, seen, strict=True):
        X, Xf = xq[name], xf[name]
        scale = float(H.abs().max())
        torch.testing.assert_close(H.double(), X.T @ X / len(X), rtol=1e-4, atol=1e-5 * scale)
        R_want, D_want = (X - Xf).T @ X / len(X), (X - Xf).T @ (X - Xf) / len(X)
        if fb is None:
            torch.testing.assert_close(R.double(), R_want, rtol=1e-3, atol=1e-5 * scale)
            torch.testing.assert_close(D.double(), D_want, rtol=1e-3, atol=1e-5 * scale)
            continue
        per_linear.append(name)
        assert R is None and D is None
        wr_scale = float((W @ R_want).abs().max()) + 1e-30
        torch.testing.assert_close(fb.WR.double(), W @ R_want, rtol=1e-3, atol=1e-4 * wr_scale)
        wdw = ((W @ D_want) * W).sum(-1)
        torch.testing.assert_close(fb.w_d_w, wdw, rtol=1e-3, atol=1e-5 * float(wdw.max()))
    assert per_linear == [n for n in names if n.endswith("down_proj")]  # only where it is cheaper
    assert torch.count_nonzero(seen[0][1]) == 0  # layer 0 q/k/v: both streams are the embeddings
    o_proj = [r for n, r in zip(names, seen, strict=True) if n.endswith("o_proj")][-1]
    assert float(o_proj[1].abs().max()) > 1e-3 * float(o_proj[0].abs().max())


def test_recomputing_the_fp_stream_gives_the_same_result_as_keeping_it(models):
    """The memory-bounded fallback (FP copy of the layer, recomputed per group) is exact."""
    from transformers import AutoModelForCausalLM

    from tsq_vllm.quantize.pipeline import quantize_model

    src = models["qwen2"]
    opts = opts_for(src, src / "unused")
    ids = torch.randint(0, 384, (6, 32), generator=torch.Generator().manual_seed(3))
    kept, recomputed = (
        quantize_model(
            AutoModelForCausalLM.from_pretrained(src).eval(), ids, opts, fp_cache_bytes=budget
        )
        for budget in (2**30, 0)
    )
    assert list(kept.packed) == list(recomputed.packed)
    for name, t in kept.packed.items():
        for leaf, value in t.tensors(name).items():
            assert torch.equal(value, recomputed.packed[name].tensors(name)[leaf]), leaf
