"""Corrupt or inconsistent checkpoints: `load_quantized` and the launcher's pre-check refuse them.

Each row corrupts a private copy of a checkpoint this tool wrote, then asserts that
`tsq_vllm.load_quantized` raises a ValueError with the row's text, and that
`python -m tsq_vllm.serve DIR` exits 2 with exactly that kind of one line on stderr, before vLLM
is imported (its `main` is called in-process), leaving the directory unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tsq_vllm
from tests.reliability.conftest import snapshot
from tsq_vllm.checkpoint import check_checkpoint_files, read_checkpoint_config
from tsq_vllm.serve.__main__ import main as serve_main

LAYER = "model.layers.1.mlp.up_proj"


def _tensors(d: Path, edit) -> None:
    f = d / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f), metadata={"format": "pt"})


def _qconfig(d: Path, **changes) -> None:
    for name in ("config.json", "quantize_config.json"):
        f = d / name
        cfg = json.loads(f.read_text())
        qc = cfg["quantization_config"] if name == "config.json" else cfg
        for k, v in changes.items():
            if v is None:
                qc.pop(k, None)
            else:
                qc[k] = v
        f.write_text(json.dumps(cfg))


def _config(d: Path, **changes) -> None:
    f = d / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _set(name: str, value):
    def edit(s):
        s[f"{LAYER}.{name}"] = value(s[f"{LAYER}.{name}"]).contiguous()

    return edit


def _extra_index(d: Path) -> None:
    names = list(load_file(str(d / "model.safetensors")))
    weight_map = {n: "model.safetensors" for n in [*names, "model.layers.9.mlp.up_proj.qweight"]}
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _nudge_scales(s):
    s[f"{LAYER}.scales"] = (
        s[f"{LAYER}.scales"] * 1.01
    ).contiguous()  # finite, right shape: only the hash knows


# name: (corrupt(dir), text in load_quantized's error, text in the launcher's one line)
ROWS = {
    "NaN in scales": (
        lambda d: _tensors(
            d, _set("scales", lambda t: t.index_fill(1, torch.tensor([3]), float("nan")))
        ),
        f"{LAYER}.scales has 4 NaN/inf value(s) of 1024",
        None,
    ),
    "inf in scales": (
        lambda d: _tensors(
            d, _set("scales", lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))
        ),
        f"{LAYER}.scales has 256 NaN/inf value(s)",
        None,
    ),
    "zero points out of range": (
        lambda d: _tensors(d, _set("qzeros", lambda t: torch.full_like(t, -1))),
        "qzeros decodes to zero points in [16, 16]",
        None,
    ),
    "scales stored as int32": (
        lambda d: _tensors(d, _set("scales", lambda t: t.to(torch.int32))),
        f"corrupt checkpoint: {LAYER}: scales has dtype torch.int32",
        None,
    ),
    "qweight one row short": (
        lambda d: _tensors(d, _set("qweight", lambda t: t[:-1])),
        f"corrupt checkpoint: {LAYER}: qweight has shape (15, 256) (K=120, N=256 at 4 bits)",
        None,
    ),
    "checkpoint_format flipped to gptq_v2": (
        lambda d: _qconfig(d, checkpoint_format="gptq_v2"),
        "checkpoint_format='gptq_v2' differs from checkpoint_format='gptq' "
        "recorded in tsq.integrity",
        None,
    ),
    "bits edited": (
        lambda d: _qconfig(d, bits=8),
        "bits=8 differs from bits=4 recorded in tsq.integrity",
        None,
    ),
    "scales changed after writing": (
        lambda d: _tensors(d, _nudge_scales),
        "differs from the sha256 recorded when it was written",
        None,
    ),
    "group_size missing": (
        lambda d: _qconfig(d, group_size=None),
        "quantization_config has no 'group_size'",
        None,
    ),
    "wrong hidden_size in config.json": (
        lambda d: _config(d, hidden_size=96),
        "corrupt checkpoint: model.layers.0.mlp.down_proj holds a layer with K=256, "
        "N=128 at 4 bits, but the model's linear has in_features=256, "
        "out_features=96",
        None,
    ),
    "truncated shard": (
        _truncate,
        "corrupt checkpoint: cannot read model.safetensors",
        "model.safetensors is truncated",
    ),
    "index names a tensor no shard holds": (
        _extra_index,
        None,
        "model.layers.9.mlp.up_proj.qweight, which "
        "model.safetensors.index.json puts in model.safetensors, is not in that file",
    ),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_corrupt_checkpoint_is_refused(ckpt, capsys, row):
    corrupt, load_text, serve_text = ROWS[row]
    corrupt(ckpt)
    before = snapshot(ckpt)
    if load_text is not None:
        with pytest.raises(ValueError) as e:
            tsq_vllm.load_quantized(ckpt)
        assert load_text in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()
    assert serve_main([str(ckpt), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and err.startswith("error: ") and (serve_text or load_text) in err
    ), err
    assert snapshot(ckpt) == before


def test_intact_checkpoint_passes_both(ckpt):
    model = tsq_vllm.load_quantized(ckpt)
    assert model.model.layers[1].mlp.up_proj.bits == 4
    check_checkpoint_files(ckpt, read_checkpoint_config(ckpt))


def test_other_tools_checkpoints_are_accepted_unverified(tiny, tmp_path):
    """No tsq.integrity block (AutoGPTQ, GPTQModel, RTN fixtures): loads, nothing to verify."""
    from tests.serve.conftest import write_rtn_checkpoint

    d = write_rtn_checkpoint(tiny, tmp_path / "rtn", 4, 32, quant_method="gptq")
    assert "integrity" not in json.loads((d / "config.json").read_text())[
        "quantization_config"
    ].get("tsq", {})
    tsq_vllm.load_quantized(d)
    check_checkpoint_files(d, read_checkpoint_config(d))


def test_written_fingerprint_names_format_and_every_weight_file(written):
    import hashlib

    qc = json.loads((written / "config.json").read_text())["quantization_config"]
    fp = qc["tsq"]["integrity"]
    assert {k: fp[k] for k in ("checkpoint_format", "bits", "group_size", "sym")} == {
        k: qc[k] for k in ("checkpoint_format", "bits", "group_size", "sym")
    }
    assert fp["files"] == {
        "model.safetensors": hashlib.sha256(
            (written / "model.safetensors").read_bytes()
        ).hexdigest()
    }
    assert json.loads((written / "quantize_config.json").read_text()) == qc


def test_launcher_help_says_other_flags_go_to_vllm(capsys):
    assert serve_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m tsq_vllm.serve MODEL_DIR")
    assert "Every argument after MODEL_DIR is passed to vLLM's OpenAI server unchanged" in out
