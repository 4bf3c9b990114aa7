"""Checks of a quantization job that need the model's config but none of its weights.

Each runs before the weights are read, so a bad source costs seconds and one line, not a
calibration run and a traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.integrity import read_header, weight_files
from ..models import ModelSource

__all__ = [
    "protected_paths",
    "check_head",
    "check_seqlen",
    "check_source_files",
    "warn_unservable",
]

logger = logging.getLogger("tsq_vllm.quantize")


def protected_paths(src: ModelSource) -> list[Path]:
    """Local directories the job reads from, which --output must never replace (a GGUF's folder
    too)."""
    path = Path(src.path).expanduser()
    return [path] if path.is_dir() else []


def check_seqlen(config: Any, seqlen: int) -> None:
    """Windows longer than the model's context calibrate on positions it never saw in training."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and 0 < limit < seqlen:
        raise ValueError(
            f"--seqlen {seqlen} exceeds the model's max_position_embeddings={limit}: "
            f"use --seqlen {limit} or less"
        )


def check_head(config: Any, bits: int, group_size: int) -> None:
    """--quantize-lm-head: the output head must be an nn.Linear whose shape the layout can store."""
    from transformers import AutoModelForCausalLM

    from ..format.gptq import check_linear_shape
    from .head import find_head

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    name, head = find_head(skeleton)
    try:
        check_linear_shape(head.in_features, head.out_features, bits, group_size)
    except ValueError as e:
        raise ValueError(f"--quantize-lm-head: {name}: {e}") from None


def check_source_files(src: ModelSource, config: Any) -> None:
    """Every safetensors file of a local source is whole, and its tensors have the config's
    shapes."""
    from transformers import AutoModelForCausalLM

    path = Path(src.path).expanduser()
    if src.gguf_file or not path.is_dir():
        return  # GGUF files and hub ids are read by transformers' own loaders
    shapes: dict[str, tuple[list[int], str]] = {}
    files, _ = weight_files(path, "re-download the model")
    for f in files:
        try:
            header = read_header(f)
        except ValueError as e:
            raise ValueError(f"--model {src.label!r}: {e}") from None
        except OSError as e:
            raise ValueError(
                f"--model {src.label!r}: cannot read {f.name} ({e.strerror or e})"
            ) from None
        shapes.update({k: (list(v.get("shape", [])), f.name) for k, v in header.items()})
    if not shapes:
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    for key, param in skeleton.state_dict().items():
        if key in shapes and shapes[key][0] != list(param.shape):
            got, name = shapes[key]
            raise ValueError(
                f"--model {src.label!r}: {key} is {got} in {name} but config.json implies "
                f"{list(param.shape)} (hidden_size={getattr(config, 'hidden_size', '?')}, "
                f"intermediate_size={getattr(config, 'intermediate_size', '?')}): config.json "
                "does not match the weights; fix it"
            )


def warn_unservable(config: Any) -> None:
    """One warning when vLLM (if installed) has no model class for the architecture; quantizing
    proceeds."""
    archs = list(getattr(config, "architectures", None) or [])
    if not archs or importlib.util.find_spec("vllm") is None:
        return
    # vLLM announces its platform on import; that is not this tool's output.
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            from vllm.model_executor.models import ModelRegistry

            supported = set(ModelRegistry.get_supported_archs())
    except Exception:  # a broken vLLM install must not stop quantization
        return
    finally:
        logging.disable(logging.NOTSET)
    if not any(a in supported for a in archs):
        logger.warning(
            "vLLM %s cannot serve architecture %s: the checkpoint will load with "
            "tsq_vllm.load_quantized but not with python -m tsq_vllm.serve",
            _vllm_version(),
            "/".join(archs),
        )


def _vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except (ImportError, AttributeError):
        return "?"
