"""One reader of a checkpoint's quantization config: `read_quantization_config` (None for a
directory that is not a tsq/GPTQ checkpoint) and its strict form `read_checkpoint_config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsq_vllm.checkpoint import read_checkpoint_config, read_quantization_config

QC = {"quant_method": "gptq", "bits": 3, "group_size": 64, "sym": True}


def _write(
    d: Path,
    config: object | None = None,
    quantize_config: object | None = None,
    weights: bool = True,
) -> Path:
    d.mkdir()
    for name, content in (("config.json", config), ("quantize_config.json", quantize_config)):
        if content is not None:
            (d / name).write_text(content if isinstance(content, str) else json.dumps(content))
    if weights:
        (d / "model.safetensors").write_bytes(b"")
    return d


# name: (config.json, quantize_config.json, bits read or None for "not a checkpoint")
FOUND = {
    "config.json quantization_config": ({"quantization_config": QC}, None, 3),
    "config.json wins over quantize_config.json": (
        {"quantization_config": QC},
        {**QC, "bits": 4},
        3,
    ),
    "quantize_config.json fallback (GPTQ tools)": ({"model_type": "llama"}, QC, 3),
    "fallback without quant_method (older GPTQ tools)": ({}, {"bits": 2, "group_size": 32}, 2),
    "full-precision model": ({"model_type": "llama"}, None, None),
    "another method": ({"quantization_config": {"quant_method": "awq", "bits": 4}}, None, None),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_reader_finds_the_config_or_none(tmp_path, name):
    config, qconfig, bits = FOUND[name]
    d = _write(tmp_path / "m", config, qconfig)
    got = read_quantization_config(d)
    assert (None if got is None else got.bits) == bits
    if bits is not None:
        assert read_checkpoint_config(d) == got  # the strict form agrees wherever both accept


def test_reader_without_config_json_is_none(tmp_path):
    assert read_quantization_config(_write(tmp_path / "m", None, QC)) is None


# name: (config.json, quantize_config.json, text of the one-line error)
CORRUPT = {
    "config.json not JSON": ("{not json", None, "config.json is not valid JSON"),
    "quantize_config.json not JSON": ({}, "{", "quantize_config.json is not valid JSON"),
    "no bits": (
        {"quantization_config": {"quant_method": "tsq", "group_size": 64}},
        None,
        "has no 'bits'",
    ),
    "bits 5": ({"quantization_config": {**QC, "bits": 5}}, None, "bits"),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_config_is_one_line_for_both(tmp_path, name):
    config, qconfig, msg = CORRUPT[name]
    d = _write(tmp_path / "m", config, qconfig)
    for read in (read_quantization_config, read_checkpoint_config):
        with pytest.raises(ValueError, match=msg) as e:
            read(d)
        assert "\n" not in str(e.value)


# name: (config.json, quantize_config.json, weights present, text of the strict form's error)
NOT_SERVABLE = {
    "no quantization config": ({"model_type": "llama"}, None, True, "not a tsq/GPTQ checkpoint"),
    "another method": (
        {"quantization_config": {"quant_method": "awq"}},
        None,
        True,
        "quant_method='awq'",
    ),
    "no safetensors": ({"quantization_config": QC}, None, False, r"no \*.safetensors"),
}


def test_a_quantized_lm_head_is_servable(tmp_path):
    d = _write(tmp_path / "m", {"quantization_config": {**QC, "lm_head": True}}, None, True)
    assert read_checkpoint_config(d).lm_head is True


@pytest.mark.parametrize("name", list(NOT_SERVABLE))
def test_strict_form_names_why_it_cannot_serve(tmp_path, name):
    config, qconfig, weights, msg = NOT_SERVABLE[name]
    with pytest.raises(ValueError, match=msg):
        read_checkpoint_config(_write(tmp_path / "m", config, qconfig, weights))
