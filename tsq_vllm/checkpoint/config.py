"""Reading a checkpoint directory's quantization config: one reader for the loader, eval and
serving.

`read_quantization_config` reads `config.json["quantization_config"]`, else `quantize_config.json`
(what GPTQ tools also write), and returns None for a directory that is not a tsq/GPTQ checkpoint,
so callers can fall back to a full-precision model. `read_checkpoint_config` is its strict form
for the launcher, which needs "must be a servable checkpoint". Both raise one-line ValueErrors
for corrupt JSON and invalid fields. The vLLM config `TsqConfig` reads the dict vLLM hands it
through the same `parse_quant_config`, so a checkpoint is refused with the same message wherever
it is met.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..format.config import QUANT_METHOD, CheckpointQuantConfig

__all__ = [
    "SERVABLE_METHODS",
    "parse_quant_config",
    "read_quantization_config",
    "read_checkpoint_config",
]

# `--quantization tsq` serves our own checkpoints and plain GPTQ ones (same tensor layout).
SERVABLE_METHODS = (QUANT_METHOD, "gptq")


def _method(raw: dict[str, Any]) -> str:
    # A quantize_config.json of older GPTQ tools names no method; tsq's own always does.
    return str(raw.get("quant_method", QUANT_METHOD)).lower()


def parse_quant_config(
    raw: dict[str, Any], where: str = "quantization_config"
) -> CheckpointQuantConfig:
    """Validate a tsq/GPTQ `quantization_config` dict for serving; ValueError names the bad
    field."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(raw).__name__}")
    method = _method(raw)
    if method not in SERVABLE_METHODS:
        raise ValueError(
            f"{where} has quant_method={method!r}: tsq serves only {SERVABLE_METHODS} "
            f"checkpoints; quantize the model with `python -m tsq_vllm.quantize`"
        )
    dynamic = raw.get("dynamic") or {}
    overrides = (
        [p for p in dynamic if not str(p).startswith("-:")] if isinstance(dynamic, dict) else []
    )
    if overrides:
        raise ValueError(
            f"{where} has per-module overrides in 'dynamic' ({overrides[0]!r}, ...): tsq needs one "
            f"bits/group_size for all layers; re-quantize without 'dynamic' overrides"
        )
    return _from_dict(raw, where)


def _from_dict(raw: dict[str, Any], where: str) -> CheckpointQuantConfig:
    try:
        return CheckpointQuantConfig.from_dict({**raw, "quant_method": _method(raw)})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _load_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"corrupt checkpoint: {file} is not valid JSON ({e}): re-export the checkpoint"
        ) from None


def _raw_config(path: Path) -> tuple[Any, str] | None:
    """(the stored quantization_config, where it was found), or None if neither file holds one."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    config = _load_json(config_file)
    raw = config.get("quantization_config") if isinstance(config, dict) else None
    if raw is not None:
        return raw, f"{path.name}/{config_file.name}:quantization_config"
    if (path / "quantize_config.json").is_file():
        return _load_json(path / "quantize_config.json"), f"{path.name}/quantize_config.json"
    return None


def read_quantization_config(path: str | Path) -> CheckpointQuantConfig | None:
    """The checkpoint's quantization config if `path` is a tsq or GPTQ checkpoint, else None."""
    found = _raw_config(Path(path).expanduser())
    if found is None:
        return None
    raw, where = found
    if not isinstance(raw, dict) or _method(raw) not in SERVABLE_METHODS:
        return None
    return _from_dict(raw, f"corrupt checkpoint: {where}")


def read_checkpoint_config(model_dir: str | Path) -> CheckpointQuantConfig:
    """The quantization config of a local checkpoint directory that can be served, or a one-line
    ValueError; also checks that safetensors weights are present."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"model directory {str(model_dir)!r} does not exist: pass the output directory of "
            f"`python -m tsq_vllm.quantize`"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: it is not a Hugging Face model directory")
    found = _raw_config(path)
    if found is None:
        raise ValueError(
            f"{path} has no quantization_config in config.json and no quantize_config.json: it is "
            "not a tsq/GPTQ checkpoint; quantize it with `python -m tsq_vllm.quantize --model "
            f"{path}`"
        )
    # Not read_quantization_config's None: a foreign method gets its own message.
    cfg = parse_quant_config(*found)
    if not any(path.glob("*.safetensors")):
        raise ValueError(
            f"{path} has no *.safetensors weights: tsq reads safetensors checkpoints only"
        )
    return cfg
