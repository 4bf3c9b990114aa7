"""Writing and reading GPTQ-layout checkpoints (layout: docs/format.md).

`save_quantized` writes into a temporary directory beside the output and renames it into place
only when everything is written, so a crash or a bad tensor never leaves a half checkpoint
behind, and an existing checkpoint is replaced only by a complete one.

`load_quantized` rebuilds the transformers model from config.json without reading or
initializing dense weights for the quantized linears, swaps those linears for `QuantLinear`
(which keeps the packed tensors and dequantizes with the torch reference) or, for a BCQ
checkpoint (GPTQT), `BCQLinear` (decoded once with `format.bcq.dequantize_bcq`), and loads every
tensor from safetensors files only: pickled `.bin` weights are never opened.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..format.bcq import BCQTensors
from ..format.config import INTEGRITY_KEY, CheckpointQuantConfig
from ..format.gptq import GPTQLayer
from .atomic import check_output, new_sibling, normal_permissions, replace_dir, write_manifest
from .config import read_quantization_config
from .integrity import INDEX_NAME, WEIGHTS_NAME, fingerprint, verify_fingerprint, weight_files
from .modules import BCQLinear, QuantLinear
from .tensorfile import TensorInfo, nbytes, tensor_info, write_safetensors

__all__ = [
    "BCQLinear",
    "QuantLinear",
    "CheckpointSpec",
    "save_quantized",
    "finish_checkpoint",
    "load_quantized",
    "checkpoint_tensors",
]


def _tied_targets(model: Any) -> set[str]:
    """State-dict keys that transformers ties to another key (lm_head.weight to the embeddings)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not tied and out_emb is not None and getattr(model.config, "tie_word_embeddings", False):
        # transformers 4.x has no all_tied_weights_keys: the output embedding is the tied one.
        tied = {f"{name}.weight" for name, m in model.named_modules() if m is out_emb}
    return tied


def _stored(key: str, value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """An unquantized tensor as written: on CPU, in `dtype` if it is floating, finite."""
    value = value.detach().to("cpu")
    if not value.is_floating_point():
        return value
    if not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"{key} contains NaN/inf values, which are never written: the source model is "
            f"corrupt; re-download or re-export it"
        )
    if dtype is not None and value.dtype != dtype:
        value = value.to(dtype)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"{key} has values beyond the range of {str(dtype).removeprefix('torch.')}: "
                "store the unquantized tensors in bfloat16 or float32 (--dtype)"
            )
    return value


def checkpoint_tensors(
    model: Any,
    packed: Mapping[str, GPTQLayer | BCQTensors],
    dtype: torch.dtype | None = None,
    *,
    prefix: str = "",
    exclude: str | None = None,
) -> dict[str, torch.Tensor]:
    """Everything the checkpoint stores: unquantized tensors in `dtype` (default: their own), and
    packed linears (GPTQ or BCQ).

    `model` may be one module of the model whose keys start with `prefix` (a decoder layer:
    "model.layers.3."); keys starting with `exclude` are left out (the decoder stack, when its
    layers were written one by one)."""
    out: dict[str, torch.Tensor] = {}
    tied = _tied_targets(model) if hasattr(model, "config") else set()
    seen: dict[tuple[int, int], str] = {}
    for rel, value in model.state_dict().items():
        key = prefix + rel
        if exclude is not None and key.startswith(exclude):
            continue
        owner, _, leaf = key.rpartition(".")
        if owner in packed and leaf == "weight":
            continue  # the packed tensors replace it
        storage = (value.untyped_storage().data_ptr(), value.storage_offset())
        if key in tied and storage in seen:
            continue  # tied to a tensor already written; the loader re-ties it
        seen.setdefault(storage, key)
        # clone() also breaks any other storage sharing, which safetensors refuses.
        out[key] = _stored(key, value, dtype).contiguous().clone()
    for name, t in packed.items():
        out.update({k: v.contiguous() for k, v in t.tensors(name).items()})
    return out


def _info(tensors: Mapping[str, torch.Tensor], key: str) -> TensorInfo:
    # A lazy mapping (the journal's layer files) knows it without reading the tensor.
    info = getattr(tensors, "info", None)
    return info(key) if callable(info) else tensor_info(tensors[key])


def _shards(infos: dict[str, TensorInfo], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(infos):
        n = nbytes(infos[key])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def _write_weights(
    tensors: Mapping[str, torch.Tensor], directory: Path, max_bytes: int
) -> list[str]:
    """Write the shards one at a time and each tensor on its own (`write_safetensors`): memory
    holds one tensor of a lazy mapping at a time, in the bytes `save_file` would write."""
    infos = {k: _info(tensors, k) for k in tensors}
    shards = _shards(infos, max_bytes)
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        shard = {k: infos[k] for k in keys}
        write_safetensors(directory / name, shard, tensors.__getitem__, {"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    if len(shards) == 1:
        return names
    total = sum(nbytes(i) for i in infos.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def save_quantized(
    model: Any,
    packed: dict[str, GPTQLayer | BCQTensors],
    qconfig: CheckpointQuantConfig,
    output: str | Path,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    max_shard_bytes: int = 4 * 10**9,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` with its linears in `packed` replaced by GPTQ (or BCQ) tensors, its other
    floating tensors in `dtype` (default: the model's); returns the output path."""
    output = Path(output).expanduser().absolute()
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_sibling(output, "partial")
    try:
        spec = CheckpointSpec(model, qconfig, tokenizer, overwrite, max_shard_bytes, dtype)
        finish_checkpoint(tmp, checkpoint_tensors(model, packed, dtype), spec, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """Everything a checkpoint directory is written from, besides its tensors."""

    model: Any
    qconfig: CheckpointQuantConfig
    tokenizer: Any = None
    overwrite: bool = False
    max_shard_bytes: int = 4 * 10**9
    dtype: torch.dtype | None = None


def finish_checkpoint(
    tmp: Path,
    tensors: Mapping[str, torch.Tensor],
    spec: CheckpointSpec,
    output: Path,
    discard: Callable[[], None] | None = None,
) -> None:
    """Write the weights, config and tokenizer into the partial directory `tmp`, then move it to
    `output`. `discard` runs once the weights are written (it removes what they were read from)."""
    files = _write_weights(tensors, tmp, spec.max_shard_bytes)
    if discard is not None:
        discard()
    # The fingerprint lets loaders detect a hand-edited format field or a changed weight file.
    qconfig = dataclasses.replace(
        spec.qconfig,
        tsq={
            **spec.qconfig.tsq,
            INTEGRITY_KEY: fingerprint(spec.qconfig.to_dict(), [tmp / f for f in files]),
        },
    )
    model = spec.model
    config = copy.deepcopy(model.config)
    config.quantization_config = qconfig.to_dict()
    config.dtype = spec.dtype or model.dtype  # what the unquantized tensors were written in
    # GGUF-derived configs lack it, and vLLM picks the model class by it.
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    (tmp / "quantize_config.json").write_text(json.dumps(qconfig.to_dict(), indent=2) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(tmp)
    if spec.tokenizer is not None:
        spec.tokenizer.save_pretrained(tmp)
    check_output(output, spec.overwrite)  # it may have appeared while quantizing
    write_manifest(tmp)
    normal_permissions(tmp)
    replace_dir(tmp, output)


def _weight_files(path: Path) -> list[Path]:
    try:
        files, _ = weight_files(path, "re-download or re-quantize")
    except ValueError as e:
        raise ValueError(f"corrupt checkpoint: {e}") from None
    if not files:
        raise ValueError(
            f"no {WEIGHTS_NAME} or {INDEX_NAME} in {str(path)!r}: only safetensors checkpoints "
            "can be loaded"
        )
    return files


def _read_tensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(
                f"corrupt checkpoint: cannot read {f.name} ({e}); re-download or re-quantize"
            ) from e
    return tensors


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """A transformers causal LM from a tsq/GPTQ checkpoint, quantized linears as `QuantLinear`.

    Every quantized linear's tensors are checked against its shape, bits and group size, and every
    other tensor must match the model; anything else raises ValueError naming the tensor.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} does not exist or is not a directory")
    qc = read_quantization_config(path)
    if qc is None:
        raise ValueError(
            f"{str(path)!r} is not a quantized checkpoint: config.json has no tsq/gptq "
            "quantization_config"
        )
    tensors = _read_tensors(_weight_files(path))
    config = AutoConfig.from_pretrained(path)
    # transformers would look for a quantizer named "tsq"; the linears are swapped in below instead.
    del config.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)

    marker = f".{qc.tensor_names[0]}"  # .qweight, or .bcq_bits
    prefixes = sorted(k[: -len(marker)] for k in tensors if k.endswith(marker))
    if not prefixes:
        raise ValueError(f"corrupt checkpoint: {str(path)!r} has no {marker} tensors")
    for prefix in prefixes:
        try:
            lin = model.get_submodule(prefix)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise ValueError(
                f"corrupt checkpoint: {prefix}{marker} does not belong to an nn.Linear of this "
                "model"
            )
        missing = [n for n in qc.required_tensor_names if f"{prefix}.{n}" not in tensors]
        if missing:
            raise ValueError(f"corrupt checkpoint: {prefix} lacks {', '.join(missing)}")
        stored = {
            n: tensors.pop(f"{prefix}.{n}") for n in qc.tensor_names if f"{prefix}.{n}" in tensors
        }
        read = qc.read_bcq_layer if qc.is_bcq else qc.read_layer
        layer = read(stored, prefix, lin.in_features, lin.out_features)
        bias = tensors.pop(f"{prefix}.bias", None)
        if (bias is None) != (lin.bias is None):
            raise ValueError(
                f"corrupt checkpoint: {prefix}.bias is "
                f"{'missing' if bias is None else 'unexpected'}"
            )
        if bias is not None and tuple(bias.shape) != (lin.out_features,):
            raise ValueError(
                f"corrupt checkpoint: {prefix}.bias has shape {list(bias.shape)}, expected "
                f"[{lin.out_features}]"
            )
        bias = None if bias is None else bias.to(lin.bias.dtype)
        quant: nn.Module
        if isinstance(layer, BCQTensors):
            quant = BCQLinear(layer, bias, lin.weight.dtype)
        else:
            quant = QuantLinear(layer, bias)
        model.set_submodule(prefix, quant)

    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise ValueError(f"corrupt checkpoint: {str(e).strip().splitlines()[-1].strip()}") from e
    quantized = tuple(f"{p}." for p in prefixes)
    tied = _tied_targets(model)
    missing = [k for k in result.missing_keys if not k.startswith(quantized) and k not in tied]
    if missing:
        raise ValueError(
            f"corrupt checkpoint: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    if result.unexpected_keys:
        raise ValueError(
            f"corrupt checkpoint: unexpected tensors {result.unexpected_keys[:5]} for this config"
        )
    # Last, so that a more specific message above wins; checkpoints of other tools have no
    # fingerprint.
    verify_fingerprint(path, qc.tsq)
    model.tie_weights()
    return model.to(device).eval()
