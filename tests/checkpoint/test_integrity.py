"""`read_header`: a truncated, padded or garbage safetensors file is found from its header alone.
`weight_files`: the shards a directory holds, by its index or by glob."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tsq_vllm.checkpoint.integrity import INDEX_NAME, read_header, weight_files


@pytest.fixture
def written(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(64), "b": torch.ones(3, 5)}, f)
    return f


def test_read_header_lists_the_tensors(written):
    assert {k: v["shape"] for k, v in read_header(written).items()} == {"a": [64], "b": [3, 5]}


@pytest.mark.parametrize(
    "damage,msg",
    [
        (lambda d: d[:-4], "is truncated"),
        (lambda d: d + b"\0", "padded or corrupt"),
        (lambda d: d[:5], "too short"),
        (lambda d: b"\xff" * 8 + d[8:], "header claims"),
    ],
)
def test_read_header_finds_truncation_and_padding(written, damage, msg):
    written.write_bytes(damage(written.read_bytes()))
    with pytest.raises(ValueError, match=msg):
        read_header(written)


def test_weight_files_without_an_index_are_every_safetensors_file(tmp_path):
    for name in ("b.safetensors", "a.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert weight_files(tmp_path, "fix") == (
        [tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
        {},
    )


@pytest.mark.parametrize(
    "index,present,msg",
    [
        (
            {"weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}},
            ["s1.safetensors"],
            r"s2\.safetensors, named in model\.safetensors\.index\.json, is missing: fix$",
        ),
        ({"metadata": {}}, [], r"has no readable weight_map \('weight_map'\): fix$"),
        (["not", "a", "map"], [], r"has no readable weight_map .*: fix$"),
    ],
    ids=["missing shard", "no weight_map", "not an object"],
)
def test_weight_files_refuses_a_broken_index(tmp_path, index, present, msg):
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    for name in present:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=msg):
        weight_files(tmp_path, "fix")


def test_weight_files_with_an_index_follow_its_map(tmp_path):
    wm = {"x": "s2.safetensors", "y": "s1.safetensors", "z": "s2.safetensors"}
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": wm}))
    for name in ("s1.safetensors", "s2.safetensors", "stray.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert weight_files(tmp_path, "fix") == (
        [tmp_path / "s1.safetensors", tmp_path / "s2.safetensors"],
        wm,
    )
