"""The source's dtypes (`storage_dtype`) and what the checkpoint stores with `--dtype`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import held_open, linear_prefixes, opts_for, single_thread
from tsq_vllm.models import ModelSource, load_config
from tsq_vllm.quantize.run import run_quantization
from tsq_vllm.quantize.source import storage_dtype

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.mark.parametrize(
    "name,requested,expected",
    [
        ("llama", "auto", torch.float32),
        ("qwen2-bf16", "auto", torch.bfloat16),
        ("llama", "bfloat16", torch.bfloat16),
        ("qwen2-bf16", "float32", torch.float32),
        ("llama", "float16", torch.float16),
    ],
)
def test_storage_dtype_is_the_sources_unless_asked(models, name, requested, expected):
    src = ModelSource(str(models[name]))
    assert storage_dtype(src, load_config(src), requested) == expected


def test_gguf_sources_are_stored_in_bf16_and_dtype_without_config_is_read_from_the_file(
    models, tmp_path
):
    src = ModelSource(str(models["llama"]))
    config = load_config(src)
    assert storage_dtype(ModelSource("x", "m.gguf"), config) == torch.bfloat16
    config.dtype = None  # then the first floating tensor of the safetensors file decides
    assert storage_dtype(src, config) == torch.float32
    with pytest.raises(ValueError, match="--dtype 'int8' is not supported"):
        storage_dtype(src, config, "int8")


@pytest.mark.parametrize("name,dtype", [("llama", "bfloat16"), ("qwen2-bf16", "float32")])
def test_dtype_changes_only_the_unquantized_tensors(models, tmp_path, name, dtype):
    src = models[name]
    auto = run_quantization(opts_for(src, tmp_path / "auto", bits=4)).output
    cast = run_quantization(opts_for(src, tmp_path / "cast", bits=4, dtype=dtype)).output
    a, c = load_file(auto / "model.safetensors"), load_file(cast / "model.safetensors")
    assert a.keys() == c.keys()
    quantized = {p + "." + n for p in linear_prefixes(a) for n in ("qweight", "qzeros", "scales")}
    want = getattr(torch, dtype)
    for key in a:
        if key in quantized or not a[key].is_floating_point():
            assert torch.equal(a[key], c[key]), key  # the quantization itself is unchanged
        else:
            assert c[key].dtype == want and torch.equal(c[key], a[key].to(want)), key
    assert json.loads((cast / "config.json").read_text())["dtype"] == dtype


def test_a_value_beyond_the_storage_dtype_is_refused_in_one_line():
    from torch import nn

    from tsq_vllm.checkpoint.hf import checkpoint_tensors

    model = nn.Linear(4, 4)
    with torch.no_grad():
        model.weight[0, 0] = 1e6  # beyond float16's 65504
    assert checkpoint_tensors(model, {}, torch.bfloat16)["weight"].dtype == torch.bfloat16
    with pytest.raises(ValueError) as info:
        checkpoint_tensors(model, {}, torch.float16)
    assert str(info.value) == (
        "weight has values beyond the range of float16: store the unquantized tensors in "
        "bfloat16 or float32 (--dtype)"
    )


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps")
@pytest.mark.parametrize("shard", [None, "150KB"], ids=["one-file", "sharded"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_reading_layers_keeps_no_part_of_the_source_mapped_or_open(tmp_path, arch, shard):
    # Pages read through a memory map stay resident while it lives: a mapped source would grow
    # the process by each layer's bytes.
    from tests.helpers import make_tiny_model
    from tsq_vllm.quantize.source import open_model

    path = make_tiny_model(tmp_path / arch, arch, layers=3, max_shard_size=shard)
    files = sorted(path.glob("*.safetensors"))
    assert (len(files) > 1) == (shard is not None)
    src = ModelSource(str(path))
    model, streamer = open_model(src, load_config(src))
    assert streamer is not None
    assert held_open(files) == []
    for i, layer in enumerate(streamer.stack):
        streamer.load_layer(i, layer)
        assert not any(p.is_meta for p in layer.parameters())
        assert held_open(files) == [], f"after layer {i}"
    streamer.load_outside(with_output=True)
    assert held_open(files) == []
