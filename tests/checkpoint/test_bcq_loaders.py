"""BCQ (GPTQT) checkpoints: `load_quantized` and the launcher's pre-check read them, and refuse
corrupt ones with the same one-line reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tsq_vllm
from tests.helpers import make_tiny_model, opts_for, single_thread
from tsq_vllm.checkpoint.config import read_checkpoint_config
from tsq_vllm.checkpoint.validate import check_checkpoint_files
from tsq_vllm.quantize.run import run_quantization

_threads = pytest.fixture(autouse=True, scope="module")(single_thread)
LAYER = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def bcq_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bcq")
    src = make_tiny_model(root / "llama", "llama")
    return run_quantization(opts_for(src, root / "ckpt", method="gptqt", bits=3)).output


def _edit_tensors(d: Path, edit) -> None:
    t = load_file(str(d / "model.safetensors"))
    edit(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def _nan_alpha(t):
    t[f"{LAYER}.bcq_alpha"][0, 0, 0] = float("nan")


def _set_bits(d: Path) -> None:
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((d / name).read_text())
        (cfg["quantization_config"] if name == "config.json" else cfg)["bits"] = 2
        (d / name).write_text(json.dumps(cfg))


CORRUPT = {
    "nan-alpha": (lambda d: _edit_tensors(d, _nan_alpha), f"{LAYER}: bcq_alpha has 1 NaN/inf"),
    "missing-offset": (
        lambda d: _edit_tensors(d, lambda t: t.pop(f"{LAYER}.bcq_offset")),
        f"{LAYER} lacks bcq_offset",
    ),
    "bits-edited": (_set_bits, "bits=2 differs from bits=3 recorded in tsq.integrity"),
    "wrong-planes": (
        lambda d: _edit_tensors(
            d, lambda t: t.update({f"{LAYER}.bcq_bits": t[f"{LAYER}.bcq_bits"][:2].clone()})
        ),
        "must be float [k=2",
    ),
}


def test_bcq_checkpoint_loads_and_passes_the_pre_check(bcq_ckpt):
    cfg = read_checkpoint_config(bcq_ckpt)
    assert cfg.is_bcq and cfg.bits == 3
    check_checkpoint_files(bcq_ckpt, cfg)
    model = tsq_vllm.load_quantized(bcq_ckpt)
    lin = model.get_submodule(LAYER)
    assert type(lin).__name__ == "BCQLinear"
    assert torch.equal(lin.weight, lin.dequantized_weight(lin.weight.dtype))


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_bcq_checkpoints_are_refused(bcq_ckpt, tmp_path, name):
    edit, text = CORRUPT[name]
    d = tmp_path / name
    shutil.copytree(bcq_ckpt, d)
    edit(d)
    with pytest.raises(ValueError, match="corrupt checkpoint|differs from") as e1:
        tsq_vllm.load_quantized(d)
    assert text in str(e1.value)
    with pytest.raises(ValueError) as e2:
        check_checkpoint_files(d, read_checkpoint_config(d))
    assert text in str(e2.value)
