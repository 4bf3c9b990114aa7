"""Shared inputs of the bad-input suite: a tiny model, a checkpoint this tool wrote, tree
snapshots."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model, single_thread

FAST = [
    "--nsamples",
    "4",
    "--seqlen",
    "32",
    "--clip-points",
    "10",
    "--bits",
    "4",
    "--group-size",
    "32",
]

_one_thread = pytest.fixture(autouse=True, scope="package")(single_thread)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones too) with its content hash: equal snapshots, equal
    trees."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = (
            "dir"
            if p.is_dir() and not p.is_symlink()
            else hashlib.sha256(p.read_bytes()).hexdigest()
        )
    return out


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="package")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("src") / "llama", "llama")


@pytest.fixture(scope="package")
def written(tiny, tmp_path_factory) -> Path:
    """A checkpoint written by `python -m tsq_vllm.quantize` (4-bit, group 32, format gptq)."""
    from tsq_vllm.quantize.__main__ import main

    out = tmp_path_factory.mktemp("ckpt") / "tiny-int4"
    assert (
        main(
            ["--model", str(tiny), "--calib", f"text:{tiny}/calib.txt", "--output", str(out), *FAST]
        )
        == 0
    )
    return out


@pytest.fixture
def ckpt(written, tmp_path) -> Path:
    """A private copy of the written checkpoint, free to corrupt."""
    return Path(shutil.copytree(written, tmp_path / "ckpt"))
