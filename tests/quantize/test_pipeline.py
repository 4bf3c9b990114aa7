"""End to end on tiny random models: quantize → checkpoint → independent unpack → reload.

The bit unpacking here is written from docs/format.md (a little-endian bit stream along K
for qweight and along N for qzeros), deliberately not through tsq_vllm.format, so a bug shared by
the packer and its own unpacker cannot pass. What the pipeline computes on the way (the run
record, ablations, scale signs, Hessian streams) is tested in test_pipeline_algorithm.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tsq_vllm
from tests.helpers import linear_prefixes, make_config, opts_for, single_thread
from tsq_vllm.models import ModelSource, load_model
from tsq_vllm.quantize.run import run_quantization

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def unpack_stream(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Values [count, ...] from int32 words [n_words, ...] holding a low-bits-first bit stream
    along axis 0."""
    w = words.astype(np.int64) & 0xFFFFFFFF
    w = np.concatenate([w, np.zeros_like(w[:1])])  # a zero word past the end for straddling reads
    pos = np.arange(count) * bits
    word, shift = pos // 32, pos % 32
    lo = w[word] >> shift[:, None]
    hi = w[word + 1] << (32 - shift)[:, None]  # only matters where shift + bits > 32
    return (lo | np.where((shift + bits > 32)[:, None], hi, 0)) & ((1 << bits) - 1)


def reference_weight(t: dict[str, torch.Tensor], prefix: str, bits: int, fmt: str) -> torch.Tensor:
    """W [N, K] decoded from the checkpoint tensors of one linear, by the layout spec."""
    qweight = t[f"{prefix}.qweight"].numpy()  # [K·b/32, N]
    qzeros = t[f"{prefix}.qzeros"].numpy()  # [n_g, N·b/32]
    scales = t[f"{prefix}.scales"].float()  # [n_g, N]
    g_idx = t[f"{prefix}.g_idx"].long()  # [K]
    K, N = g_idx.numel(), qweight.shape[1]
    codes = torch.from_numpy(unpack_stream(qweight, bits, K))  # [K, N]
    zeros = torch.from_numpy(unpack_stream(qzeros.T, bits, N)).T  # [n_g, N]
    zeros = zeros + (1 if fmt == "gptq" else 0)
    return (scales[g_idx] * (codes - zeros[g_idx]).float()).t()  # [N, K]


def read_checkpoint(out: Path) -> dict[str, torch.Tensor]:
    index = out / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(out / f))
    return tensors


CASES = [
    ("llama", dict(bits=3, group_size=32)),
    ("qwen2", dict(bits=4, group_size=64, checkpoint_format="gptq_v2")),
    ("mistral", dict(bits=2, group_size=32, act_order=True, max_shard_size="200KB")),
    ("qwen2-bf16", dict(bits=8, group_size=128, sym=True)),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] + "-int" + str(c[1]["bits"]) for c in CASES])
def test_end_to_end(models, tmp_path, name, kw):
    src = models[name]
    job = run_quantization(opts_for(src, tmp_path / "out", **kw))
    out, bits, fmt = job.output, kw["bits"], kw.get("checkpoint_format", "gptq")
    tensors = read_checkpoint(out)
    prefixes = linear_prefixes(tensors)
    assert len(prefixes) == 14 and prefixes == sorted(job.result.stats)

    source = load_file(src / "model.safetensors")
    # The oracle model: the source with every quantized weight replaced by its independent decode.
    expected_model = load_model(ModelSource(str(src)))
    for prefix in prefixes:
        assert f"{prefix}.weight" not in tensors
        assert (f"{prefix}.bias" in tensors) == (
            f"{prefix}.bias" in source
        )  # qwen2 has q/k/v biases
        assert tensors[f"{prefix}.scales"].dtype == torch.float16
        W = reference_weight(tensors, prefix, bits, fmt)
        lin = expected_model.get_submodule(prefix)
        lin.weight.data = W.to(lin.weight.dtype)
        if not kw.get("act_order"):
            assert torch.equal(
                tensors[f"{prefix}.g_idx"].long(), torch.arange(W.shape[1]) // kw["group_size"]
            )
    for key, value in source.items():  # embeddings, norms, lm_head: untouched, in their dtype
        if key.rpartition(".")[0] not in prefixes:
            assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((out / "quantize_config.json").read_text())
    assert config["dtype"] == str(source["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file(), f
    if "max_shard_size" in kw:
        assert (out / "model.safetensors.index.json").is_file() and len(
            list(out.glob("model-*.safetensors"))
        ) > 1

    reloaded = tsq_vllm.load_quantized(out)
    ids = torch.randint(0, 384, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = expected_model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    assert type(reloaded.get_submodule(prefixes[0])).__name__ == "QuantLinear"
    tol = 1e-5 if expected.dtype == torch.float32 else 2e-2  # bf16 matmuls may take other kernels
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def checkpoint_digest(out: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())}


def test_same_seed_same_bytes_other_seed_other_bytes(models, tmp_path):
    src = models["llama"]
    a = run_quantization(opts_for(src, tmp_path / "a")).output
    b = run_quantization(opts_for(src, tmp_path / "b")).output
    c = run_quantization(opts_for(src, tmp_path / "c", seed=1)).output
    assert checkpoint_digest(a) == checkpoint_digest(b)
    assert checkpoint_digest(a)["model.safetensors"] != checkpoint_digest(c)["model.safetensors"]


def test_overwrite_replaces_a_checkpoint_completely(models, tmp_path):
    out = tmp_path / "o"
    run_quantization(opts_for(models["llama"], out, bits=4, group_size=32, max_shard_size="100KB"))
    assert (out / "model.safetensors.index.json").is_file()
    run_quantization(opts_for(models["llama"], out, bits=3, group_size=32, overwrite=True))
    # The old run's shards and index are gone: the directory holds exactly the new checkpoint.
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no partial or old directories


def test_loader_rejects_corrupt_checkpoints(models, tmp_path):
    from safetensors.torch import save_file

    out = run_quantization(opts_for(models["llama"], tmp_path / "o", bits=4, group_size=32)).output
    good = load_file(out / "model.safetensors")
    prefix = "model.layers.1.mlp.up_proj"

    bad = dict(good)
    bad[f"{prefix}.qweight"] = good[f"{prefix}.qweight"][:-1].contiguous()
    save_file(bad, out / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=rf"corrupt checkpoint: {prefix}: qweight has shape \(15, 256\) "
        r"\(K=120, N=256 at 4 bits\)",
    ):
        tsq_vllm.load_quantized(out)

    bad = {k: v for k, v in good.items() if k != f"{prefix}.g_idx"}
    save_file(bad, out / "model.safetensors")
    with pytest.raises(ValueError, match=f"{prefix} lacks g_idx"):
        tsq_vllm.load_quantized(out)

    bad = {k: v for k, v in good.items() if k != "model.norm.weight"}
    save_file(bad, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['model.norm.weight'\]"):
        tsq_vllm.load_quantized(out)

    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt checkpoint: cannot read model.safetensors"):
        tsq_vllm.load_quantized(out)

    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 5
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        tsq_vllm.load_quantized(out)


def test_fused_projections_and_reload(tmp_path):
    """Phi-3 fuses q/k/v and gate/up into one linear each: groups follow the modules, not names."""
    from transformers import AutoModelForCausalLM

    from tsq_vllm.checkpoint.hf import save_quantized
    from tsq_vllm.quantize.pipeline import quantize_model

    torch.manual_seed(0)
    cfg = make_config("phi3", max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    opts = opts_for(tmp_path, tmp_path / "out", bits=4, group_size=32)
    result = quantize_model(model, ids, opts)
    assert sorted({n.rsplit(".", 1)[1] for n in result.packed}) == [
        "down_proj",
        "gate_up_proj",
        "o_proj",
        "qkv_proj",
    ]
    out = save_quantized(
        model,
        result.packed,
        opts.quantization_config(model_source="phi3", tool_version="t"),
        opts.output,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            tsq_vllm.load_quantized(out)(input_ids=ids).logits, model(input_ids=ids).logits
        )


@pytest.mark.parametrize(
    "name,kw",
    [
        ("llama", dict(bits=3, group_size=32)),  # the default: GPTAQ target, both stages, R
        ("mistral", dict(bits=2, group_size=32, act_order=True, quantize_lm_head=True)),
        ("qwen2", dict(bits=4, group_size=64, stage1=False, stage2=False, gptaq_alpha=0.0)),
    ],
    ids=["llama-default", "mistral-int2-act-order-head", "qwen2-plain-gptq"],
)
def test_shared_in_place_factorizations_write_the_bytes_of_the_old_code(
    models, tmp_path, monkeypatch, name, kw
):
    """One factorization per input, in place, and the accumulators released as they are
    finalized: the checkpoint is byte for byte the one the two-Cholesky code wrote."""
    from tests.core.factor_oracle import old_moments, use_old_factorizations
    from tsq_vllm.core import HessianAccumulator

    new = run_quantization(opts_for(models[name], tmp_path / "new", **kw)).output
    with monkeypatch.context() as m:
        use_old_factorizations(m)
        m.setattr(HessianAccumulator, "take", old_moments)
        old = run_quantization(opts_for(models[name], tmp_path / "old", **kw)).output
    assert checkpoint_digest(new) == checkpoint_digest(old)
