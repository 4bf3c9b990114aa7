"""The launcher's pre-check of a checkpoint's files, without importing vLLM.

The launcher must fail in one line before a minute-long engine start, so everything vLLM would
otherwise crash on while loading is checked here from the safetensors headers and tensors.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ..format.config import CheckpointQuantConfig
from .integrity import INDEX_NAME, read_header, verify_fingerprint, weight_files

__all__ = ["check_checkpoint_files"]


def _linear_shapes(path: Path) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every nn.Linear of the model config.json describes (meta
    device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        config.quantization_config = None  # transformers would look for a "tsq" quantizer
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}/config.json does not describe a model transformers can build ({e}): "
            f"re-export the checkpoint"
        ) from None
    return {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def check_checkpoint_files(model_dir: str | Path, cfg: CheckpointQuantConfig) -> None:
    """Everything vLLM would otherwise crash on a minute into loading, as one ValueError: every
    shard whole, every indexed tensor present, every quantized linear's tensors consistent with
    config.json and `cfg` (shapes, dtypes, finite scales, zero points in range), and the recorded
    fingerprint."""
    from safetensors import safe_open

    path = Path(model_dir)
    shards, weight_map = weight_files(path, "re-download or re-export the checkpoint")
    headers: dict[str, dict[str, Any]] = {}
    for f in shards:
        name = f.name
        try:
            headers[name] = read_header(f)
        except ValueError as e:
            raise ValueError(f"corrupt checkpoint: {path}/{e}") from None
    location = {t: name for name, header in headers.items() for t in header}
    for tensor, name in weight_map.items():
        if location.get(tensor) != name:
            raise ValueError(
                f"corrupt checkpoint: {tensor}, which {INDEX_NAME} puts in {name}, is not in that "
                "file: re-export the checkpoint"
            )
    linears = _linear_shapes(path)
    marker = "." + cfg.tensor_names[0]  # .qweight, or .bcq_bits for BCQ
    prefixes = sorted(t[: -len(marker)] for t in location if t.endswith(marker))
    if not prefixes:
        raise ValueError(
            f"corrupt checkpoint: {path} has no {marker} tensors: it is not "
            f"{'BCQ' if cfg.is_bcq else 'GPTQ'}-packed"
        )
    with contextlib.ExitStack() as stack:
        files = {
            name: stack.enter_context(safe_open(str(path / name), framework="pt"))
            for name in headers
        }
        for prefix in prefixes:
            missing = [n for n in cfg.required_tensor_names if f"{prefix}.{n}" not in location]
            if missing:
                raise ValueError(
                    f"corrupt checkpoint: {prefix} lacks {', '.join(missing)}: re-export the "
                    "checkpoint"
                )
            if prefix not in linears:
                raise ValueError(
                    f"corrupt checkpoint: {prefix}{marker} does not belong to a linear layer of "
                    "the model config.json describes: re-export the checkpoint"
                )
            stored = {
                n: files[location[f"{prefix}.{n}"]].get_tensor(f"{prefix}.{n}")
                for n in cfg.tensor_names
                if f"{prefix}.{n}" in location
            }
            read = cfg.read_bcq_layer if cfg.is_bcq else cfg.read_layer
            read(stored, prefix, *linears[prefix])
    verify_fingerprint(path, cfg.tsq)
