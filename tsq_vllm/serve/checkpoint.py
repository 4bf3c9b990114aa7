"""Reading and checking a checkpoint's quantization config, without importing vLLM.

Both the launcher (which must fail in one line before a minute-long engine start) and the vLLM
config `TsqConfig` read the same dict through `parse_quant_config`, so a checkpoint is refused
with the same message wherever it is met.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from ..format.config import QUANT_METHOD, CheckpointQuantConfig
from ..format.gptq import TENSOR_NAMES
from ..format.integrity import read_header, verify_fingerprint

__all__ = ["SERVABLE_METHODS", "parse_quant_config", "read_checkpoint_config", "check_checkpoint_files"]

_INDEX = "model.safetensors.index.json"

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


def _shard_names(path: Path) -> tuple[list[str], dict[str, str]]:
    """The weight files, and the index's tensor -> file map (empty without an index)."""
    index = path / _INDEX
    if not index.is_file():
        return sorted(f.name for f in path.glob("*.safetensors")), {}
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values())), dict(weight_map)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} has no readable weight_map ({e}): re-export the checkpoint") from None


def _linear_shapes(path: Path) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every nn.Linear of the model config.json describes (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        config.quantization_config = None  # transformers would look for a "tsq" quantizer
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}/config.json does not describe a model transformers can build ({e}): "
                         f"re-export the checkpoint") from None
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def check_checkpoint_files(model_dir: str | Path, cfg: CheckpointQuantConfig) -> None:
    """Everything vLLM would otherwise crash on a minute into loading, as one ValueError: every shard
    whole, every indexed tensor present, every quantized linear's tensors consistent with config.json
    and `cfg` (shapes, dtypes, finite scales, zero points in range), and the recorded fingerprint."""
    from safetensors import safe_open

    path = Path(model_dir)
    names, weight_map = _shard_names(path)
    headers: dict[str, dict[str, Any]] = {}
    for name in names:
        if not (path / name).is_file():
            raise ValueError(f"{path / name}, named in {_INDEX}, is missing: re-download or re-export the checkpoint")
        try:
            headers[name] = read_header(path / name)
        except ValueError as e:
            raise ValueError(f"corrupt checkpoint: {path}/{e}") from None
    location = {t: name for name, header in headers.items() for t in header}
    for tensor, name in weight_map.items():
        if location.get(tensor) != name:
            raise ValueError(f"corrupt checkpoint: {tensor}, which {_INDEX} puts in {name}, is not in that file: "
                             f"re-export the checkpoint")
    linears = _linear_shapes(path)
    prefixes = sorted(t[: -len(".qweight")] for t in location if t.endswith(".qweight"))
    if not prefixes:
        raise ValueError(f"corrupt checkpoint: {path} has no .qweight tensors: it is not GPTQ-packed")
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(safe_open(str(path / name), framework="pt")) for name in headers}
        for prefix in prefixes:
            missing = [n for n in TENSOR_NAMES if f"{prefix}.{n}" not in location]
            if missing:
                raise ValueError(f"corrupt checkpoint: {prefix} lacks {', '.join(missing)}: re-export the checkpoint")
            if prefix not in linears:
                raise ValueError(f"corrupt checkpoint: {prefix}.qweight does not belong to a linear layer of the "
                                 f"model config.json describes: re-export the checkpoint")
            stored = {n: files[location[f"{prefix}.{n}"]].get_tensor(f"{prefix}.{n}") for n in TENSOR_NAMES}
            cfg.read_layer(stored, prefix, *linears[prefix])
    verify_fingerprint(path, cfg.tsq)
