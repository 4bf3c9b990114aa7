"""The per-layer journal of a quantization run, in its partial output directory.

Each finished decoder layer's tensors (packed linears, norms, biases) go to their own
`layer-NNNNN.safetensors` in the `.NAME.<pid>.<hex>.partial` sibling of --output as soon as the
layer is done, and `tsq_journal.json` records it:

  {"version": 1, "key": {...},             what determines the bytes: options, calibration
                                           fingerprint, source, layer count, tool version
   "layers": [{"index": 0, "file": "layer-00000.safetensors", "sha256": "...",
               "stats": {...}}, ...]}      a contiguous prefix 0..k-1 of the decoder stack

A layer file is written under a temporary name, flushed and renamed before the journal (itself
replaced atomically) lists it, so after a `kill -9` every listed file is complete; a resumed run
re-hashes them and continues after the last good one. A journal whose key differs from the new
run's is refused with the first field that differs: its layers were made with other settings.

A partial directory holding a journal with at least one finished layer is *resumable*: the stale
partial cleanup (`atomic.remove_stale_partials`) keeps it and says how to resume or remove it,
since hours of quantization may be in it. Only a successful `--resume` consumes it; the user
deletes one that is not wanted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .atomic import (
    JOURNAL_NAME,
    claim_partial,
    new_sibling,
    owner_alive,
    partial_siblings,
    resumable_layers,
)
from .integrity import sha256_file
from .tensorfile import SafetensorsFile, TensorInfo

__all__ = ["JOURNAL_NAME", "SPILL_DIR", "Journal", "LayerFiles", "resumable_layers"]

SPILL_DIR = "spill"  # activation streams over --max-memory, only while the run is alive

logger = logging.getLogger("tsq_vllm.checkpoint")

_VERSION = 1


def _read(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / JOURNAL_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        return None
    if not isinstance(data.get("key"), dict) or not isinstance(data.get("layers"), list):
        return None
    return data


class LayerFiles(Mapping[str, torch.Tensor]):
    """The tensors of the journal's layer files by name, each read only when asked for, with
    plain reads: nothing stays mapped (or open), so writing the checkpoint from them holds one
    tensor at a time."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            layer = SafetensorsFile(f)
            self._where.update(dict.fromkeys(layer.keys(), layer))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def info(self, key: str) -> TensorInfo:
        """dtype and shape of tensor `key`, from its file's header (nothing is read)."""
        return self._where[key].info(key)


class Journal:
    """The journal of one run in its partial directory (see the module docstring)."""

    def __init__(self, directory: Path, key: dict[str, Any], layers: list[dict[str, Any]]):
        self.directory = directory
        self.key = key
        self.layers = layers

    @property
    def done(self) -> int:
        return len(self.layers)

    @classmethod
    def create(cls, output: Path, key: dict[str, Any]) -> Journal:
        output.parent.mkdir(parents=True, exist_ok=True)
        journal = cls(new_sibling(output, "partial"), key, [])
        journal._save()
        return journal

    @classmethod
    def resume(cls, output: Path, key: dict[str, Any]) -> Journal:
        """Take over the newest resumable partial run of `output` made with the same `key`."""
        candidates = []
        for d in partial_siblings(output):
            if owner_alive(d):
                continue  # a run in progress (another process) is not ours to take
            data = _read(d)
            if data and data["layers"]:
                candidates.append((d.stat().st_mtime, d, data))
        if not candidates:
            raise ValueError(
                f"--resume: no interrupted run of --output {str(output)!r} to resume (an "
                "interrupted run leaves a .partial directory beside it): run without --resume"
            )
        candidates.sort(key=lambda c: c[0], reverse=True)
        for _, d, data in candidates:
            if data["key"] == key:
                return cls._take_over(d, key, data["layers"])
        theirs = candidates[0][2]["key"]
        # In the key's order: an option that differs explains more than the windows it changed.
        field = next(k for k in [*key, *theirs] if key.get(k) != theirs.get(k))
        if field == "calibration":
            what = (
                "was calibrated on other token windows than this run (the calibration text changed)"
            )
        else:
            what = f"was made with {field}={theirs.get(field)!r}, this one with {key.get(field)!r}"
        raise ValueError(
            f"--resume: the interrupted run in {str(candidates[0][1])!r} {what}: rerun with the "
            "same options and calibration, or without --resume to start over"
        )

    @classmethod
    def _take_over(cls, d: Path, key: dict[str, Any], layers: list[dict[str, Any]]) -> Journal:
        fresh = claim_partial(d)  # this process's pid, so no other run takes it for stale
        good: list[dict[str, Any]] = []
        for i, entry in enumerate(layers):
            f = fresh / str(entry.get("file"))
            if entry.get("index") != i or not f.is_file() or sha256_file(f) != entry.get("sha256"):
                logger.warning("layer %d of the interrupted run is damaged: redoing it", i)
                break
            good.append(entry)
        shutil.rmtree(fresh / SPILL_DIR, ignore_errors=True)  # the dead run's activations
        listed = {e["file"] for e in good}
        for f in fresh.iterdir():  # files of unlisted or damaged layers, half-written ones
            if f.name.startswith("layer-") and f.name not in listed:
                f.unlink()
        journal = cls(fresh, key, good)
        journal._save()
        return journal

    def write_layer(self, index: int, tensors: dict[str, torch.Tensor], stats: Any) -> None:
        """Record layer `index` (the next one) as finished, with its tensors and statistics."""
        from safetensors.torch import save_file

        if index != self.done:
            raise RuntimeError(f"layer {index} finished before layer {self.done}: this is a bug")
        name = f"layer-{index:05d}.safetensors"
        tmp = self.directory / (name + ".tmp")
        save_file(tensors, str(tmp), {"format": "pt"})
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / name)
        self.layers.append(
            {
                "index": index,
                "file": name,
                "sha256": sha256_file(self.directory / name),
                "stats": stats,
            }
        )
        self._save()

    def layer_files(self) -> LayerFiles:
        return LayerFiles([self.directory / e["file"] for e in self.layers])

    def read_layer(self, index: int) -> dict[str, torch.Tensor]:
        return SafetensorsFile(self.directory / self.layers[index]["file"]).read_all()

    def discard_layers(self) -> None:
        """Remove the layer files and the journal (their tensors are in the checkpoint now)."""
        for e in self.layers:
            (self.directory / e["file"]).unlink(missing_ok=True)
        (self.directory / JOURNAL_NAME).unlink(missing_ok=True)

    def _save(self) -> None:
        data = {"version": _VERSION, "key": self.key, "layers": self.layers}
        tmp = self.directory / (JOURNAL_NAME + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / JOURNAL_NAME)
