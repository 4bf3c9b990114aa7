"""The source model's tensors, read lazily, and the dtypes they are computed and stored in.

`storage_dtype` is what the checkpoint stores the unquantized tensors in (embeddings, norms,
lm_head, biases).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint.integrity import read_header, weight_files
from ..models import ModelSource

__all__ = ["STORAGE_DTYPES", "storage_dtype"]

STORAGE_DTYPES = ("auto", "bfloat16", "float16", "float32")
_SAFETENSORS_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def storage_dtype(src: ModelSource, config: Any, requested: str = "auto") -> torch.dtype:
    """`requested`, or with "auto" the source's own dtype.

    A GGUF source has no such dtype (transformers dequantizes it to float32, which would double
    the size of the vocabulary matrices): bfloat16, the dtype such models are trained in. A
    safetensors source loads in its config's dtype (what `from_pretrained(dtype="auto")` uses),
    else in the dtype of its first floating tensor.
    """
    if requested not in STORAGE_DTYPES:
        raise ValueError(f"--dtype {requested!r} is not supported: use one of {STORAGE_DTYPES}")
    if requested != "auto":
        return getattr(torch, requested)
    if src.gguf_file:
        return torch.bfloat16
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    if isinstance(saved, torch.dtype):
        return saved
    return _first_floating_dtype(src) or torch.float32


def _first_floating_dtype(src: ModelSource) -> torch.dtype | None:
    path = Path(src.path).expanduser()
    if not path.is_dir():
        return None
    for f in weight_files(path, "re-download the model")[0]:
        for entry in read_header(f).values():
            if entry.get("dtype") in _SAFETENSORS_FLOATS:
                return _SAFETENSORS_FLOATS[entry["dtype"]]
    return None
