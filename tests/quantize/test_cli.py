"""`python -m tsq_vllm.quantize`: flags, one-line errors on bad input, nothing left behind on
failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model, single_thread
from tsq_vllm.quantize.__main__ import build_parser, main, parse_options

FAST = ["--nsamples", "4", "--seqlen", "32", "--clip-points", "10"]


_one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama")


def test_every_flag_of_the_issue_exists_and_has_help():
    actions = {opt: a for a in build_parser()._actions for opt in a.option_strings}
    wanted = [
        "--model",
        "--gguf-file",
        "--bits",
        "--group-size",
        "--sym",
        "--act-order",
        "--calib",
        "--nsamples",
        "--seqlen",
        "--damp",
        "--no-stage1",
        "--no-stage2",
        "--no-error-feedback",
        "--scale-search",
        "--mse-norm",
        "--no-gptq",
        "--checkpoint-format",
        "--device",
        "--seed",
        "--output",
        "--overwrite",
        "--error-feedback-alpha",
        "--scale-box",
        "--energy-match",
    ]
    for flag in wanted:
        assert flag in actions, flag
        assert actions[flag].help and len(actions[flag].help) > 10, flag


def _bad_model(root: Path, name: str, **cfg) -> Path:
    return make_tiny_model(root / name, "llama", **cfg)


BAD = {
    "unknown bits": (
        lambda root, tiny: ["--model", str(tiny), "--bits", "5"],
        "--bits 5 is not supported: use one of 2, 3, 4, 8",
    ),
    "group does not divide": (
        lambda root, tiny: [
            "--model",
            str(_bad_model(root, "h96", hidden=96, intermediate=192, heads=3, kv_heads=1)),
            "--group-size",
            "64",
            "--calib",
            f"text:{tiny}/calib.txt",
        ],
        "in_features=96 is not a multiple of group_size=64: pick a group size that divides 96",
    ),
    "int3 needs multiples of 32": (
        lambda root, tiny: [
            "--model",
            str(_bad_model(root, "kv16", heads=8, kv_heads=1)),
            "--bits",
            "3",
            "--group-size",
            "32",
            "--calib",
            f"text:{tiny}/calib.txt",
        ],
        "k_proj: out_features=16 is not a multiple of 32, which 3-bit GPTQ packing needs",
    ),
    "missing model": (
        lambda root, tiny: ["--model", str(root / "no-such-model")],
        "does not exist",
    ),
    "empty calibration": (
        lambda root, tiny: ["--model", str(tiny), "--calib", f"text:{(root / 'empty.txt')}"],
        "is empty: give a file with text in it",
    ),
    "too little calibration": (
        lambda root, tiny: ["--model", str(tiny), "--calib", f"text:{root / 'short.txt'}"],
        "fewer than --seqlen 32",
    ),
    "alpha out of range": (
        lambda root, tiny: ["--model", str(tiny), "--error-feedback-alpha", "1.5"],
        "--error-feedback-alpha 1.5 must lie in [0, 1]",
    ),
    "box below one": (
        lambda root, tiny: ["--model", str(tiny), "--scale-box", "0.5"],
        "--scale-box 0.5 must be 0 (no box) or at least 1",
    ),
    "negative refine steps": (
        lambda root, tiny: ["--model", str(tiny), "--refine-block", "-1"],
        "--refine-block -1 must be 0 (off) or a positive number of steps",
    ),
    "refine without the FP stream": (
        lambda root, tiny: ["--model", str(tiny), "--refine-block", "5", "--no-error-feedback"],
        "--refine-block 5 needs the full-precision stream",
    ),
    "unknown flag": (
        lambda root, tiny: ["--model", str(tiny), "--frobnicate"],
        "unrecognized arguments: --frobnicate",
    ),
}


@pytest.mark.parametrize("extra, debug", [([], False), (["--debug"], True)])
def test_parse_options_separates_debug_from_the_options(extra, debug):
    # The benchmarks build their runs through parse_options; --debug is the CLI's, not an option.
    opts, got = parse_options(["--model", "m", "--output", "o", "--bits", "2", *extra])
    assert got is debug
    assert (opts.model, opts.output, opts.bits) == ("m", "o", 2)
    assert not hasattr(opts, "debug")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, tiny, capsys, case):
    root = tmp_path / "inputs"
    root.mkdir()
    (root / "empty.txt").write_text(" \n\n")
    (root / "short.txt").write_text("The city.")
    make_args, message = BAD[case]
    args = make_args(root, tiny)
    outdir = tmp_path / "outputs"
    outdir.mkdir()
    argv = ["--output", str(outdir / "ckpt"), "--calib", f"text:{tiny}/calib.txt", *FAST, *args]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m tsq_vllm.quantize: error: "), err
    assert message in err
    assert list(outdir.iterdir()) == []


def test_existing_output_is_refused_and_kept(tmp_path, tiny, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert (
        main(
            ["--model", str(tiny), "--calib", f"text:{tiny}/calib.txt", "--output", str(out), *FAST]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists: pass --overwrite" in err
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
        and (out / "keep.txt").read_text() == "mine"
    )


def test_failure_while_writing_leaves_nothing_and_keeps_the_old_checkpoint(
    tmp_path, tiny, capsys, monkeypatch
):
    from tsq_vllm.checkpoint import hf as checkpoint

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_weights", disk_full)
    base = ["--model", str(tiny), "--calib", f"text:{tiny}/calib.txt", *FAST]
    assert main([*base, "--output", str(tmp_path / "new")]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / "tsq_manifest.json").write_text(
        '{"files": ["config.json"]}'
    )  # a checkpoint this tool wrote
    assert main([*base, "--output", str(old), "--overwrite"]) == 1
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["old"]
        and (old / "config.json").read_text() == "{}"
    )
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "tsq_manifest.json"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    return subprocess.run(
        [sys.executable, "-m", "tsq_vllm.quantize", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_module_entry_point_writes_a_checkpoint_and_exits_0(tmp_path, tiny):
    out = tmp_path / "ckpt"
    res = _run(
        [
            "--model",
            str(tiny),
            "--calib",
            f"text:{tiny}/calib.txt",
            "--output",
            str(out),
            "--bits",
            "4",
            "--group-size",
            "32",
            *FAST,
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"wrote {out}: 14 linears")
    assert "model.layers.1.mlp.down_proj: rel error" in res.stderr  # per-linear INFO log
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    bad = _run(["--model", str(tiny), "--output", str(tmp_path / "x"), "--bits", "7"], tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert (
        bad.stderr
        == "python -m tsq_vllm.quantize: error: --bits 7 is not supported: use one of 2, 3, 4, 8\n"
    )
