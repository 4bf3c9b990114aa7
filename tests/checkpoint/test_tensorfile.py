"""Safetensors read and written one tensor at a time, without memory maps (`checkpoint.tensorfile`),
against safetensors' own `save_file` / `load_file` as the oracle."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tsq_vllm.checkpoint.hf import _write_weights
from tsq_vllm.checkpoint.journal import LayerFiles
from tsq_vllm.checkpoint.tensorfile import SafetensorsFile, tensor_info, write_safetensors

ALL = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32]
ALL += [torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn]


def _tensors(dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(dtypes):
        for j, shape in enumerate([(), (0,), (3,), (5, 7), (2, 3, 4)]):
            name = f"model.layers.{(i * 7 + j) % 11}.{'ab'[j % 2]}{j}.weight"
            out[name] = (torch.randn(shape, generator=g) * 50).to(dtype)
    return out


def _mapped(path: Path) -> list[str]:
    """Lines of /proc/self/maps naming `path`, and open file descriptors on it."""
    maps = [ln for ln in Path("/proc/self/maps").read_text().splitlines() if str(path) in ln]
    fds = [str(p) for p in Path("/proc/self/fd").iterdir() if str(path) in _readlink(p)]
    return maps + fds


def _readlink(p: Path) -> str:
    try:
        return str(p.readlink())
    except OSError:
        return ""


@pytest.mark.parametrize(
    "dtypes",
    [ALL, [torch.int32, torch.float16], [torch.bfloat16], list(reversed(ALL))],
    ids=["all", "gptq", "bf16", "reversed"],
)
@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_written_bytes_equal_save_file_and_read_back_equal_load_file(tmp_path, dtypes, metadata):
    tensors = _tensors(dtypes, seed=len(dtypes))
    save_file(tensors, str(tmp_path / "oracle.safetensors"), metadata)
    infos = {k: tensor_info(v) for k, v in tensors.items()}
    write_safetensors(tmp_path / "ours.safetensors", infos, tensors.__getitem__, metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == (
        tmp_path / "oracle.safetensors"
    ).read_bytes()
    expected = load_file(str(tmp_path / "oracle.safetensors"))
    got = SafetensorsFile(tmp_path / "oracle.safetensors").read_all()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("reader", ["file", "layer_files"])
def test_reading_a_tensor_leaves_the_file_neither_mapped_nor_open(tmp_path, reader):
    path = tmp_path / "layer-00000.safetensors"
    tensors = _tensors([torch.float32, torch.int32], seed=3)
    save_file(tensors, str(path), {"format": "pt"})
    source = SafetensorsFile(path) if reader == "file" else LayerFiles([path])
    read = source.read if isinstance(source, SafetensorsFile) else source.__getitem__
    kept = {k: read(k) for k in tensors}  # the tensors stay alive: they must own their memory
    assert _mapped(path) == []
    assert all(torch.equal(kept[k], v) for k, v in tensors.items())


class _Tracked(dict):
    """Tensors made on request; records how many earlier ones were still alive each time."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.alive: list[weakref.ref] = []
        self.most = 0

    def __getitem__(self, key):
        gc.collect()
        self.most = max(self.most, sum(r() is not None for r in self.alive))
        t = super().__getitem__(key).clone()
        self.alive.append(weakref.ref(t))
        return t

    def info(self, key):
        return tensor_info(super().__getitem__(key))


@pytest.mark.parametrize("max_bytes", [10**9, 200])
def test_the_checkpoint_is_written_one_tensor_at_a_time(tmp_path, max_bytes):
    tensors = _Tracked(_tensors([torch.int32, torch.float16, torch.bfloat16], seed=5))
    files = _write_weights(tensors, tmp_path, max_bytes)
    assert tensors.most == 0  # no tensor outlived its own write
    assert (len(files) == 1) == (max_bytes == 10**9)
    back: dict[str, torch.Tensor] = {}
    for f in files:
        back.update(load_file(str(tmp_path / f)))
    assert back.keys() == dict(tensors).keys()
    assert all(torch.equal(back[k], v) for k, v in dict(tensors).items())
