"""What a checkpoint's files must satisfy before their tensors are trusted.

`weight_files` lists a directory's safetensors files the way transformers and vLLM find them (the
index's weight map, else every `*.safetensors`), for the loader, the launcher and the quantizer's
source check alike.

`read_header` checks one safetensors file without reading its tensors: a readable header, and a
file exactly as long as the header says (a truncated download or a full disk shows up here, in
milliseconds, instead of as an engine crash a minute later).

`fingerprint` / `verify_fingerprint`: the writer records, in `quantization_config["tsq"]
["integrity"]`, the format fields the tensors were packed with and the sha256 of every weight file.
`CheckpointQuantConfig` compares the fields with its own (a hand-edited `checkpoint_format` decodes
every zero point one step off), and `verify_fingerprint` re-hashes the files. Checkpoints from
other GPTQ tools carry no fingerprint and are accepted unverified.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..format.config import FINGERPRINT_FIELDS, INTEGRITY_KEY

__all__ = [
    "WEIGHTS_NAME",
    "INDEX_NAME",
    "weight_files",
    "INTEGRITY_KEY",
    "FINGERPRINT_FIELDS",
    "read_header",
    "fingerprint",
    "verify_fingerprint",
    "sha256_file",
]

_MAX_HEADER = 100 * 2**20  # safetensors' own limit
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def weight_files(path: Path, fix: str) -> tuple[list[Path], dict[str, str]]:
    """The weight files of directory `path` and the index's tensor -> file map ({} without one).

    With an index, every file it names must exist; `fix` ends the one-line ValueError otherwise.
    """
    index = path / INDEX_NAME
    if not index.is_file():
        return sorted(path.glob("*.safetensors")), {}
    try:
        weight_map = dict(json.loads(index.read_text())["weight_map"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} has no readable weight_map ({e}): {fix}") from None
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise ValueError(f"{path / missing[0]}, named in {INDEX_NAME}, is missing: {fix}")
    return [path / n for n in names], weight_map


def read_header(path: Path) -> dict[str, Any]:
    """The tensor entries of a safetensors file's header; ValueError if unreadable or truncated."""
    fix = "re-download or re-create the file"
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(
                f"{path.name} is {size} bytes, too short for a safetensors header: {fix}"
            )
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(
                f"{path.name} is truncated or not safetensors: its header claims {n} bytes "
                f"but the file has {size}: {fix}"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{path.name} has an unreadable safetensors header ({e}): {fix}"
            ) from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has an unreadable safetensors header: {fix}")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ValueError(
            f"{path.name} has a malformed safetensors header (no data_offsets): {fix}"
        ) from None
    if 8 + n + end != size:
        state = "truncated" if size < 8 + n + end else "padded or corrupt"
        raise ValueError(
            f"{path.name} is {state}: it has {size} bytes but its header describes {8 + n + end}: "
            f"{fix}"
        )
    return tensors


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(fields: dict[str, Any], files: Iterable[Path]) -> dict[str, Any]:
    """The `integrity` block for weight `files` packed with the format `fields`."""
    return {
        **{k: fields[k] for k in FINGERPRINT_FIELDS},
        "files": {f.name: sha256_file(f) for f in sorted(files)},
    }


def verify_fingerprint(directory: Path, tsq: dict[str, Any] | None) -> bool:
    """Re-hash the weight files named in `tsq["integrity"]`; False when there is no fingerprint."""
    block = (tsq or {}).get(INTEGRITY_KEY) if isinstance(tsq, dict) else None
    if not isinstance(block, dict) or not isinstance(block.get("files"), dict):
        return False
    for name, digest in sorted(block["files"].items()):
        f = directory / name
        if not f.is_file():
            raise ValueError(
                f"corrupt checkpoint: {name}, recorded in quantization_config.tsq.integrity, is "
                f"missing from {directory}: re-download or re-quantize"
            )
        if sha256_file(f) != digest:
            raise ValueError(
                f"corrupt checkpoint: {f} differs from the sha256 recorded when it was written "
                f"(quantization_config.tsq.integrity): re-download or re-quantize"
            )
    return True
