"""--max-memory: activation streams over the budget live in a memory-mapped file in the run's
partial directory, with the same checkpoint bytes as keeping them in RAM."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.helpers import opts_for, single_thread
from tsq_vllm.quantize import streams as streams_mod
from tsq_vllm.quantize.run import run_quantization
from tsq_vllm.quantize.spill import SpilledStream

_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_spilled_batches_read_back_bit_identical(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 7, 33, generator=g).to(dtype) for n in (4, 4, 3)]
    stream = SpilledStream(batches, tmp_path / "s.bin")
    assert len(stream) == 3 and (tmp_path / "s.bin").stat().st_size >= sum(
        b.numel() * b.element_size() for b in batches
    )
    for b, t in enumerate(batches):
        assert torch.equal(stream[b], t) and stream[b].dtype == dtype
    new = batches[1] * 2
    stream[1] = new
    assert torch.equal(stream[1], new) and torch.equal(stream[2], batches[2])
    with pytest.raises(RuntimeError, match="activation batch 0 changed from"):
        stream[0] = batches[2]
    stream.close()
    assert not (tmp_path / "s.bin").exists()


def _digests(d):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


@pytest.mark.parametrize(
    "budget,spilled",
    [("1KB", ["q", "fp"]), ("300KB", ["fp"]), ("1GiB", [])],  # a stream here is 256 KiB
)
def test_max_memory_spills_into_the_partial_directory_with_the_same_bytes(
    models, tmp_path, monkeypatch, budget, spilled
):
    src = models["llama"]
    reference = run_quantization(opts_for(src, tmp_path / "ram", bits=3)).output
    seen = []
    original = SpilledStream.__init__

    def spy(self, tensors, path):
        original(self, tensors, path)
        seen.append(path)
        assert path.parent.name == "spill" and path.parent.parent.name.endswith(".partial")

    monkeypatch.setattr(SpilledStream, "__init__", spy)
    out = run_quantization(opts_for(src, tmp_path / "out", bits=3, max_memory=budget)).output
    assert [p.name for p in seen] == [f"stream-{n}.bin" for n in spilled]
    assert all(not p.exists() for p in seen) and not (out / "spill").exists()
    assert _digests(out) == _digests(reference)


def test_without_a_partial_directory_the_spill_goes_to_a_temporary_one(models, tmp_path):
    from tsq_vllm.models import ModelSource, load_model

    model = load_model(ModelSource(str(models["llama"])))
    ids = torch.randint(0, 384, (4, 16), generator=torch.Generator().manual_seed(0))
    from tsq_vllm.models import find_decoder_layers

    _, stack = find_decoder_layers(model)
    s = streams_mod.ActivationStreams(
        model, stack, ids, batch_size=2, device=torch.device("cpu"), with_fp=True, max_memory=1
    )
    assert isinstance(s.hidden_q, SpilledStream) and isinstance(s.hidden_fp, SpilledStream)
    where = s.hidden_q.path.parent
    assert where.is_dir() and s.fp_cache_bytes <= 1  # the cache gets what the streams left
    s.close()
    assert not where.exists()


def test_a_bad_max_memory_is_one_line(models, tmp_path):
    with pytest.raises(ValueError, match="--max-memory 'lots' is not a size: write e.g. 500MB"):
        opts_for(models["llama"], tmp_path / "o", max_memory="lots")


def test_block_batches_read_a_spilled_stream_one_batch_at_a_time(models, monkeypatch):
    """--refine-block under --max-memory: the block's batches are read on access, not all at
    once, and equal what the streams hold."""
    from tsq_vllm.models import ModelSource, find_decoder_layers, load_model

    model = load_model(ModelSource(str(models["llama"])))
    ids = torch.randint(0, 384, (6, 16), generator=torch.Generator().manual_seed(0))
    _, stack = find_decoder_layers(model)
    s = streams_mod.ActivationStreams(
        model, stack, ids, batch_size=2, device=torch.device("cpu"), with_fp=True, max_memory=1
    )
    for group in s.begin_layer(0, stack[0]):
        s.hessian(group[0])
    reads: list[int] = []
    original = SpilledStream.__getitem__

    def counting(self, b):
        reads.append(b)
        return original(self, b)

    monkeypatch.setattr(SpilledStream, "__getitem__", counting)
    batches = s.block_batches()  # advances the FP stream through the FP layer copy first
    reads.clear()
    assert len(batches) == 3
    hidden, target, _ = batches[1]
    assert reads == [1, 1]  # the quantized input and the FP target of batch 1 only
    assert torch.equal(hidden, original(s.hidden_q, 1))
    assert torch.equal(target, original(s.hidden_fp, 1))
    s.close()
