"""`read_header`: a truncated, padded or garbage safetensors file is found from its header alone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tsq_vllm.checkpoint.integrity import read_header


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
