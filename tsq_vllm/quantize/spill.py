"""An activation stream kept in a memory-mapped file instead of RAM (`--max-memory`).

A stream is one tensor per calibration batch, replaced batch by batch as the stream advances
through a decoder layer; every batch keeps its shape and dtype from layer to layer. A
`SpilledStream` lays the batches out at fixed, page-aligned offsets of one file and reads and
writes them through a shared mapping; after each access the pages are released from the process
(`madvise(MADV_DONTNEED)`: the data stays in the file and the page cache), so the resident memory
holds only the batch being used. The values are bit-identical to keeping them in RAM.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["SpilledStream", "StreamSpill"]

logger = logging.getLogger("tsq_vllm.quantize")


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class SpilledStream:
    """A list of per-batch tensors (`len`, `[b]`, `[b] = t`) backed by a memory-mapped file."""

    def __init__(self, tensors: list[torch.Tensor], path: Path) -> None:
        self.path = path
        self.shapes = [tuple(t.shape) for t in tensors]
        self.dtype = tensors[0].dtype
        self.device = tensors[0].device  # where the batches are handed out
        self.sizes = [t.numel() * t.element_size() for t in tensors]
        self.offsets = []
        total = 0
        for size in self.sizes:
            self.offsets.append(total)
            total = _round_up(total + size, mmap.PAGESIZE)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, max(total, 1))
        self._mm = mmap.mmap(self._fd, max(total, 1), mmap.MAP_SHARED)
        for b, t in enumerate(tensors):
            self[b] = t

    def __len__(self) -> int:
        return len(self.shapes)

    def _region(self, b: int) -> torch.Tensor:
        return torch.frombuffer(
            self._mm, dtype=torch.uint8, count=self.sizes[b], offset=self.offsets[b]
        )

    def _release(self, b: int) -> None:
        length = _round_up(self.sizes[b], mmap.PAGESIZE)
        self._mm.madvise(mmap.MADV_DONTNEED, self.offsets[b], length)

    def __getitem__(self, b: int) -> torch.Tensor:
        region = self._region(b)
        out = region.clone().view(self.dtype).view(self.shapes[b])
        del region
        self._release(b)
        return out.to(self.device)

    def __setitem__(self, b: int, t: torch.Tensor) -> None:
        if tuple(t.shape) != self.shapes[b] or t.dtype != self.dtype:
            raise RuntimeError(
                f"activation batch {b} changed from {self.shapes[b]} {self.dtype} to "
                f"{tuple(t.shape)} {t.dtype} between decoder layers: cannot spill this stream"
            )
        region = self._region(b)
        region.copy_(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8))
        del region
        self._release(b)

    def close(self) -> None:
        self._mm.close()
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


class StreamSpill:
    """The activation streams of one run that went to memory-mapped files (`--max-memory`), in
    `directory` (a temporary one when None)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.spilled: list[SpilledStream] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def fit(
        self, first: Sequence[torch.Tensor], names: Sequence[str], budget: int
    ) -> tuple[dict[str, SpilledStream], int]:
        """Streams `names`, each starting as the batches `first`, within `budget` bytes of RAM,
        in order: the ones that do not fit are spilled. Returns those, and the bytes left."""
        batches = list(first)
        size = sum(h.numel() * h.element_size() for h in batches)
        left, out = budget, {}
        for name in names:
            if size <= left:
                left -= size
                continue
            if self.directory is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="tsq-")
                self.directory = Path(self._tmp.name)
            stream = SpilledStream(batches, self.directory / f"stream-{name}.bin")
            self.spilled.append(stream)
            out[name] = stream
            logger.info(
                "activation stream %s (%.1f MiB) spilled to %s: over --max-memory",
                name,
                size / 2**20,
                stream.path,
            )
        return out, left

    def close(self) -> None:
        """Remove the spill files (and their directory, once empty)."""
        for stream in self.spilled:
            stream.close()
            with contextlib.suppress(OSError):
                stream.path.parent.rmdir()
        self.spilled = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
