"""Reading and checking a checkpoint's quantization config, without importing vLLM.

Both the launcher (which must fail in one line before a minute-long engine start) and the vLLM
`CheckpointQuantConfig` read the same dict through `parse_quant_config`, so a checkpoint is refused
with the same message wherever it is met.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..format.config import QUANT_METHOD, CheckpointQuantConfig

__all__ = ["SERVABLE_METHODS", "parse_quant_config", "read_checkpoint_config"]

# `--quantization tsq` serves our own checkpoints and plain GPTQ ones (same tensor layout).
SERVABLE_METHODS = (QUANT_METHOD, "gptq")


def parse_quant_config(raw: dict[str, Any], where: str = "quantization_config") -> CheckpointQuantConfig:
    """Validate a tsq/GPTQ `quantization_config` dict for serving; ValueError names the bad field."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(raw).__name__}")
    method = str(raw.get("quant_method", QUANT_METHOD)).lower()
    if method not in SERVABLE_METHODS:
        raise ValueError(
            f"{where} has quant_method={method!r}: tsq serves only {SERVABLE_METHODS} "
            f"checkpoints; quantize the model with `python -m tsq_vllm.quantize`"
        )
    if raw.get("lm_head"):
        raise ValueError(
            f"{where} has lm_head=true: tsq serves lm_head unquantized; re-quantize with lm_head=false"
        )
    dynamic = raw.get("dynamic") or {}
    overrides = [p for p in dynamic if not str(p).startswith("-:")] if isinstance(dynamic, dict) else []
    if overrides:
        raise ValueError(
            f"{where} has per-module overrides in 'dynamic' ({overrides[0]!r}, ...): tsq needs one "
            f"bits/group_size for all layers; re-quantize without 'dynamic' overrides"
        )
    try:
        cfg = CheckpointQuantConfig.from_dict({**raw, "quant_method": method})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    return cfg


def read_checkpoint_config(model_dir: str | Path) -> CheckpointQuantConfig:
    """The quantization config of a local checkpoint directory, or a one-line ValueError.

    Reads `config.json["quantization_config"]`, else `quantize_config.json` (what GPTQ tools
    also write), and checks that safetensors weights are present.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(
            f"model directory {str(model_dir)!r} does not exist: pass the output directory of "
            f"`python -m tsq_vllm.quantize`"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json: it is not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}): re-export the checkpoint") from None
    raw = config.get("quantization_config") if isinstance(config, dict) else None
    where = f"{config_file.name}:quantization_config"
    if raw is None and (path / "quantize_config.json").is_file():
        where = "quantize_config.json"
        try:
            raw = json.loads((path / "quantize_config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / where} is not valid JSON ({e}): re-export the checkpoint") from None
    if raw is None:
        raise ValueError(
            f"{path} has no quantization_config in config.json and no quantize_config.json: it is "
            f"not a tsq/GPTQ checkpoint; quantize it with `python -m tsq_vllm.quantize --model {path}`"
        )
    cfg = parse_quant_config(raw, where=f"{path.name}/{where}")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path} has no *.safetensors weights: tsq reads safetensors checkpoints only")
    return cfg
