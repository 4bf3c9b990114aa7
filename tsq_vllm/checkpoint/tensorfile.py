"""Safetensors files read and written one tensor at a time, with plain file I/O, never a mapping.

`safe_open` memory-maps a file, and every page a tensor read touches stays mapped (resident, in
RssFile) for as long as the handle lives: a quantizer that keeps its source's handles open grows
by each decoder layer's bytes, and one that writes the checkpoint from mapped layer files holds
all of them at the end. `SafetensorsFile` reads one tensor's bytes into memory of its own, opening
the file for that read only, so what stays resident is what the caller keeps.

`write_safetensors` writes a file from a header known up front and tensors fetched one at a time
(each is released before the next is read), in exactly the bytes `safetensors.torch.save_file`
writes for the same tensors: tensors ordered by dtype (widest first) then name, the header as
compact JSON padded with spaces to 8 bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .integrity import read_header

__all__ = [
    "DTYPES",
    "SafetensorsFile",
    "TensorInfo",
    "nbytes",
    "read_exactly",
    "tensor_info",
    "write_safetensors",
]

# safetensors' dtype names, in the order of its Rust `Dtype` enum (files sort by it, widest first).
_ORDER = [
    ("BOOL", torch.bool),
    ("U8", torch.uint8),
    ("I8", torch.int8),
    ("F8_E5M2", torch.float8_e5m2),
    ("F8_E4M3", torch.float8_e4m3fn),
    ("I16", torch.int16),
    ("U16", torch.uint16),
    ("F16", torch.float16),
    ("BF16", torch.bfloat16),
    ("I32", torch.int32),
    ("U32", torch.uint32),
    ("F32", torch.float32),
    ("F64", torch.float64),
    ("I64", torch.int64),
    ("U64", torch.uint64),
]
DTYPES = dict(_ORDER)
_NAMES = {dtype: name for name, dtype in _ORDER}
_RANK = {name: i for i, (name, _) in enumerate(_ORDER)}

# (safetensors dtype name, shape) of one tensor: all a header needs.
TensorInfo = tuple[str, tuple[int, ...]]


def tensor_info(t: torch.Tensor) -> TensorInfo:
    if t.dtype not in _NAMES:
        raise ValueError(f"a {t.dtype} tensor cannot be written to safetensors here")
    return _NAMES[t.dtype], tuple(t.shape)


def nbytes(info: TensorInfo) -> int:
    """Bytes of a tensor of this dtype and shape."""
    n = DTYPES[info[0]].itemsize
    for d in info[1]:
        n *= d
    return n


class SafetensorsFile:
    """One safetensors file: its header, read once, and its tensors, each read when asked for."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries = read_header(self.path)  # checks the file is exactly as long as it says
        end = max((int(e["data_offsets"][1]) for e in self.entries.values()), default=0)
        self._data_start = self.path.stat().st_size - end

    def keys(self) -> Iterable[str]:
        return self.entries.keys()

    def info(self, name: str) -> TensorInfo:
        e = self.entries[name]
        if e.get("dtype") not in DTYPES:
            raise ValueError(
                f"{self.path.name}: tensor {name} has dtype {e.get('dtype')!r}, which cannot be "
                f"read here: re-export it as one of {', '.join(DTYPES)}"
            )
        return str(e["dtype"]), tuple(int(d) for d in e["shape"])

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name`, in memory of its own (the file is not mapped, nor left open)."""
        dtype, shape = self.info(name)
        start, end = (int(x) for x in self.entries[name]["data_offsets"])
        raw = torch.empty(end - start, dtype=torch.uint8)
        read_exactly(
            self.path,
            self._data_start + start,
            raw.numpy().data,
            f"{self.path.name} ended inside tensor {name}: re-create it",
        )
        return raw.view(DTYPES[dtype]).reshape(shape)

    def read_all(self) -> dict[str, torch.Tensor]:
        return {name: self.read(name) for name in self.entries}


def read_exactly(path: Path, offset: int, buffer: memoryview, truncated: str) -> None:
    """Fill `buffer` with the bytes of `path` from `offset` on, with plain reads (the file is not
    mapped, nor left open); ValueError(truncated) if the file ends first."""
    with Path(path).open("rb", buffering=0) as f:
        f.seek(offset)
        view, got = buffer.cast("B"), 0
        while got < len(view):  # readinto may return less than asked for
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(truncated)
            got += n


def _header(infos: dict[str, TensorInfo], metadata: dict[str, str] | None) -> tuple[bytes, list]:
    order = sorted(infos, key=lambda k: (-_RANK[infos[k][0]], k.encode()))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for k in order:
        n = nbytes(infos[k])
        dtype, shape = infos[k]
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def write_safetensors(
    path: Path,
    infos: dict[str, TensorInfo],
    get: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the tensors named in `infos` to `path`, each fetched by `get` only when its bytes are
    written and dropped before the next one: memory holds one tensor, not the file."""
    header, order = _header(infos, metadata)
    with Path(path).open("wb") as f:
        f.write(header)
        for k in order:
            t = get(k)
            if tensor_info(t) != infos[k]:
                raise RuntimeError(f"{k} is {tensor_info(t)}, its header says {infos[k]}: a bug")
            f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
