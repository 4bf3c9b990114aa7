"""Bad input to `python -m tsq_vllm.quantize`: exit status, one error line, the file system
untouched.

Every row runs in a fresh workspace (the working directory) holding a copy of the tiny source
model; the whole workspace is snapshotted before and after, so a row passes only if nothing in it
was created, changed or deleted. docs/reliability.md lists these rows.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tsq_vllm.quantize.__main__ import main

from .conftest import FAST, dead_pid, snapshot

PREFIX = "python -m tsq_vllm.quantize: error: "


def _edit_weights(ws: Path, edit) -> None:
    f = ws / "model" / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f), metadata={"format": "pt"})


def _nan_embedding_row(ws: Path) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(ws / "model")((ws / "model" / "calib.txt").read_text())[
        "input_ids"
    ]
    common = max(set(ids), key=ids.count)  # surely in every calibration window
    _edit_weights(ws, lambda s: s["model.embed_tokens.weight"][common].fill_(float("nan")))


def _nan_weight(ws: Path) -> None:
    _edit_weights(
        ws, lambda s: s["model.layers.1.self_attn.q_proj.weight"][3, 5:9].fill_(float("inf"))
    )


def _config(ws: Path, **changes) -> None:
    f = ws / "model" / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


def _copy_written(ws: Path, written: Path, name: str = "ck") -> Path:
    return Path(shutil.copytree(written, ws / name))


def _user_files(ws: Path) -> None:
    (ws / "notes" / "sub").mkdir(parents=True)
    (ws / "notes" / "thesis.txt").write_text("four years of work")
    (ws / "notes" / "sub" / "data.csv").write_text("a,b\n1,2\n")


def _truncate(f: Path, keep: float = 0.6) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


# name: (setup(ws, written) -> None, extra argv, exit status, text the one error line contains)
ROWS = {
    "output is the source model": (
        None,
        ["--output", "model", "--overwrite"],
        2,
        "source model directory",
    ),
    "output inside the source model": (
        None,
        ["--output", "model/int4"],
        2,
        "source model directory",
    ),
    "output contains the source model": (
        lambda ws, w: (ws / "models").mkdir() or shutil.move(ws / "model", ws / "models" / "m"),
        [
            "--model",
            "models/m",
            "--calib",
            "text:models/m/calib.txt",
            "--output",
            "models",
            "--overwrite",
        ],
        2,
        "source model directory",
    ),
    "output is the GGUF file's directory": (
        lambda ws, w: (ws / "g").mkdir() or (ws / "g" / "m.gguf").write_bytes(b"GGUF" + bytes(60)),
        ["--model", "g/m.gguf", "--output", "g", "--overwrite"],
        2,
        "source model directory",
    ),
    "output is the working directory": (
        None,
        ["--output", ".", "--overwrite"],
        2,
        "is the working directory",
    ),
    "output is a parent of the working directory": (
        None,
        ["--output", "..", "--overwrite"],
        2,
        "is the working directory or one of its parents",
    ),
    "output holds user files": (
        lambda ws, w: _user_files(ws),
        ["--output", "notes", "--overwrite"],
        2,
        "holds files this tool did not write",
    ),
    "tsq checkpoint plus a user file": (
        lambda ws, w: (_copy_written(ws, w) / "README.mine").write_text("my notes"),
        ["--output", "ck", "--overwrite"],
        2,
        "holds files this tool did not write",
    ),
    "tsq checkpoint plus a subdirectory": (
        lambda ws, w: (_copy_written(ws, w) / "eval").mkdir(),
        ["--output", "ck", "--overwrite"],
        2,
        "holds files this tool did not write",
    ),
    "existing output without --overwrite": (
        lambda ws, w: _copy_written(ws, w),
        ["--output", "ck"],
        2,
        "already exists: pass --overwrite",
    ),
    "output parent is a file": (
        lambda ws, w: (ws / "afile").write_text("x"),
        ["--output", "afile/out"],
        2,
        "cannot be written",
    ),
    "calibration text is random bytes": (
        lambda ws, w: (ws / "noise.txt").write_bytes(
            torch.randint(
                0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
            )
            .numpy()
            .tobytes()
        ),
        ["--calib", "text:noise.txt"],
        2,
        "is not UTF-8 text",
    ),
    "calibration text is binary": (
        lambda ws, w: (ws / "bin.txt").write_bytes(b"ab\x00\x01\x02cd" * 500),
        ["--calib", "text:bin.txt"],
        2,
        "is binary data",
    ),
    "--seqlen above max_position_embeddings": (
        None,
        ["--seqlen", "1024"],
        2,
        "--seqlen 1024 exceeds the model's max_position_embeddings=512",
    ),
    "truncated source model.safetensors": (
        lambda ws, w: _truncate(ws / "model" / "model.safetensors"),
        [],
        2,
        "model.safetensors is truncated",
    ),
    "wrong hidden_size in config.json": (
        lambda ws, w: _config(ws, hidden_size=96),
        [],
        2,
        "config.json does not match the weights",
    ),
    "NaN/inf in a weight": (
        lambda ws, w: _nan_weight(ws),
        [],
        1,
        "model.layers.1.self_attn.q_proj: the weight contains 4 NaN/inf value(s)",
    ),
    "NaN embedding row": (
        lambda ws, w: _nan_embedding_row(ws),
        [],
        1,
        "model.layers.0.self_attn.q_proj: its calibration inputs contain NaN/inf",
    ),
    "NaN in lm_head (never run by calibration)": (
        lambda ws, w: _edit_weights(ws, lambda s: s["lm_head.weight"][7, 0].fill_(float("nan"))),
        [],
        1,
        "lm_head.weight contains NaN/inf values, which are never written",
    ),
}


@pytest.fixture
def ws(tmp_path, tiny, monkeypatch) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    shutil.copytree(tiny, root / "model")
    monkeypatch.chdir(root)
    return root


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(
        ["--model", "model", "--calib", "text:model/calib.txt", "--output", "out", *FAST, *argv]
    )
    return code, capsys.readouterr().err


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "error" in line.lower()]


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input(ws, written, capsys, row):
    setup, argv, status, needle = ROWS[row]
    if setup is not None:
        setup(ws, written)
    before = snapshot(ws)
    code, err = _run(capsys, argv)
    lines = _error_lines(err)
    assert code == status and len(lines) == 1 and lines[0].startswith(PREFIX), err
    assert needle in lines[0], lines[0]
    assert snapshot(ws) == before


def test_full_disk_is_one_line_and_leaves_nothing(ws, capsys, monkeypatch):
    import safetensors.torch

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    before = snapshot(ws)
    code, err = _run(capsys, [])
    assert code == 1 and _error_lines(err) == [
        f"{PREFIX}No space left on device while writing --output 'out': free some space or pick "
        "another path"
    ]
    assert snapshot(ws) == before
    code, err = _run(capsys, ["--debug"])
    assert code == 1 and "Traceback" in err and "OSError: [Errno 28]" in err
    assert err.rstrip().splitlines()[-1].startswith(f"{PREFIX}No space left on device")
    assert snapshot(ws) == before


def test_non_finite_scales_from_the_quantizer_are_never_written(ws, capsys, monkeypatch):
    import tsq_vllm.quantize.pipeline as pipeline

    real = pipeline.quantize_linear

    def broken(*a, **k):
        qw = real(*a, **k)
        qw.scales[0, 0] = float("nan")
        return qw

    monkeypatch.setattr(pipeline, "quantize_linear", broken)
    before = snapshot(ws)
    code, err = _run(capsys, [])
    assert code == 1 and _error_lines(err) == [
        f"{PREFIX}model.layers.0.self_attn.q_proj: quantizing gave 1 NaN/inf scale(s), which are "
        "never written: retry with --no-stage2 or a larger --damp"
    ]
    assert snapshot(ws) == before


@pytest.mark.parametrize(
    "sig,status,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_signals_exit_128_plus_signal(ws, capsys, monkeypatch, sig, status, word):
    import tsq_vllm.quantize.__main__ as cli

    def killed(*_a, **_k):
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal should have interrupted the run")

    monkeypatch.setattr(cli, "run_quantization", killed)
    code, err = _run(capsys, [])
    assert code == status and err.strip().splitlines() == [
        f"python -m tsq_vllm.quantize: {word}; nothing was written"
    ]


def test_overwrite_replaces_tool_written_and_empty_dirs_only(ws, written, capsys):
    ck = Path(shutil.copytree(written, ws / "ck"))
    (ws / "empty").mkdir()
    for target in ("ck", "empty"):
        code, err = _run(capsys, ["--output", target, "--overwrite", "--bits", "3"])
        assert code == 0, err
        assert (
            json.loads((ws / target / "config.json").read_text())["quantization_config"]["bits"]
            == 3
        )
    manifest = json.loads((ck / "tsq_manifest.json").read_text())["files"]
    assert sorted(p.name for p in ck.iterdir()) == sorted([*manifest, "tsq_manifest.json"])
    assert sorted(p.name for p in ws.iterdir()) == [
        "ck",
        "empty",
        "model",
    ]  # no partial or old siblings


def test_checkpoint_from_before_the_manifest_may_be_overwritten(ws, written, capsys):
    ck = Path(shutil.copytree(written, ws / "ck"))
    (ck / "tsq_manifest.json").unlink()  # what main wrote before this file existed
    code, err = _run(capsys, ["--output", "ck", "--overwrite"])
    assert code == 0, err
    (ck / "tsq_manifest.json").unlink()
    (ck / "notes.txt").write_text("mine")
    before = snapshot(ws)
    code, err = _run(capsys, ["--output", "ck", "--overwrite"])
    assert code == 2 and "holds files this tool did not write" in err and snapshot(ws) == before


def test_stale_partials_of_dead_runs_are_removed_and_said_resumable_ones_kept(ws, capsys, caplog):
    dead, live = dead_pid(), os.getpid()
    partials = {}
    for tag, pid, marker in (
        ("dead", dead, True),
        ("live", live, True),
        ("unmarked", dead, False),
        ("other", dead, True),
        ("resumable", dead, True),
    ):
        name = "other" if tag == "other" else "out"
        d = ws / f".{name}.{pid}.{os.urandom(4).hex()}.partial"
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"half")
        if marker:
            (d / ".tsq-partial").write_text(f"{pid}\n")
        if tag == "resumable":  # a killed run that finished a decoder layer
            layers = [{"index": 0, "file": "layer-00000.safetensors", "sha256": "0", "stats": {}}]
            (d / "tsq_journal.json").write_text(json.dumps({"version": 1, "layers": layers}))
        partials[tag] = d
    with caplog.at_level("INFO", logger="tsq_vllm"):
        code, err = _run(capsys, [])
    assert code == 0, err
    assert not partials["dead"].exists()
    assert all(partials[t].exists() for t in ("live", "unmarked", "other", "resumable"))
    said = [r.getMessage() for r in caplog.records if "partial" in r.getMessage()]
    assert said == [
        f"removed 1 partial checkpoint(s) left by killed runs: {partials['dead']}",
        f"kept 1 interrupted run(s) of this --output that can be resumed: {partials['resumable']} "
        "(1 decoder layer(s) done); rerun the same command with --resume to continue, or delete "
        "the directory",
    ]
    assert ".tsq-partial" not in {p.name for p in (ws / "out").iterdir()}


def test_unservable_architecture_is_one_warning(caplog):
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from tsq_vllm.quantize.preflight import warn_unservable

    with caplog.at_level("WARNING", logger="tsq_vllm.quantize"):
        warn_unservable(SimpleNamespace(architectures=["LlamaForCausalLM"]))
        assert caplog.records == []
        warn_unservable(SimpleNamespace(architectures=["FrobnicatorForCausalLM"]))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"vLLM {__import__('vllm').__version__} cannot serve architecture FrobnicatorForCausalLM"
    ]
