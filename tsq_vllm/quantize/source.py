"""The source model's tensors, read lazily, and the dtypes they are computed and stored in.

`storage_dtype` is what the checkpoint stores the unquantized tensors in (embeddings, norms,
lm_head, biases). `open_model` gives the model to quantize: a skeleton whose parameters are on
the meta device (no memory) except the ones in front of the decoder stack (the embeddings), and
a `LayerStreamer` that materializes one decoder layer at a time from the source and releases its
quantized weights once they are packed, so peak memory does not grow with depth. Safetensors
sources are read one tensor at a time with plain file reads (`checkpoint.tensorfile`), sharded or
not, so nothing of the source stays mapped; GGUF files through transformers' own GGUF
name mapping and dequantization, one tensor at a time (its bytes read the same plain way), so the
values are those `from_pretrained` would give. A source that cannot be streamed (a hub id, a GGUF
architecture whose tensors transformers merges, tensor names that differ from the model's) is
loaded whole, as before, with one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..checkpoint.integrity import read_header, weight_files
from ..checkpoint.tensorfile import SafetensorsFile, read_exactly
from ..models import ModelSource, find_decoder_layers, load_model

__all__ = [
    "STORAGE_DTYPES",
    "storage_dtype",
    "compute_dtype",
    "SourceTensors",
    "LayerStreamer",
    "open_model",
]

logger = logging.getLogger("tsq_vllm.quantize")

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


def compute_dtype(src: ModelSource, config: Any) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` loads `src` in, which the forward passes use:
    the saved dtype, float32 for GGUF (transformers dequantizes GGUF tensors to float32)."""
    return torch.float32 if src.gguf_file else storage_dtype(src, config)


# transformers' GGUF tensor processors for these architectures merge or rename tensors while
# loading, so a tensor cannot be read on its own.
_GGUF_MERGING = ("qwen2moe", "qwen3moe", "gpt_oss", "gpt-oss", "gpt2", "minimax-m2")


class SourceTensors:
    """The source's tensors by the model's parameter names, each read only when asked for."""

    def __init__(self, names: dict[str, Any], read: Any) -> None:
        self._names = names  # model name -> where it is (a file path, or a GGUF tensor)
        self._read = read

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def get(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(f"the source has no tensor {name!r}")
        return self._read(name, self._names[name])

    @classmethod
    def safetensors(cls, path: Path) -> SourceTensors | None:
        files, _ = weight_files(path, "re-download the model")
        if not files:
            return None
        names: dict[str, Any] = {}
        for f in files:
            shard = SafetensorsFile(f)
            names.update(dict.fromkeys(shard.keys(), shard))

        # Plain reads, not `safe_open`'s memory map: pages read through a map stay resident for
        # as long as it lives, so the process would grow by every layer's source bytes.
        def read(name: str, shard: SafetensorsFile) -> torch.Tensor:
            return shard.read(name)

        return cls(names, read)

    @classmethod
    def gguf(cls, path: Path, skeleton: nn.Module) -> SourceTensors | None:
        import numpy as np
        from gguf import GGUFReader, dequantize
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        reader = GGUFReader(str(path))  # maps the file; only its header is read here
        arch = read_field(reader, "general.architecture")[0]
        if arch in _GGUF_MERGING or _gguf_has_new_loader(arch):
            return None
        # The same processor and name map `load_gguf_checkpoint` uses for the whole file.
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
        try:
            mapping = get_gguf_hf_weights_map(skeleton, processor)
        except (NotImplementedError, ValueError, KeyError):
            return None  # an architecture gguf-py cannot name: loaded whole
        # Where each tensor's bytes are, not its mapped `data`: pages read through the reader's
        # map stay resident while it lives, and with the reader dropped the file is unmapped.
        names = {
            mapping[t.name]: _GgufTensor(
                t.name, t.tensor_type, t.data_offset, t.data.dtype, t.data.shape
            )
            for t in reader.tensors
            if t.name in mapping
        }
        del reader

        def read(_name: str, t: _GgufTensor) -> torch.Tensor:
            raw = np.empty(t.shape, dtype=t.dtype)  # the reader's view of the bytes, own memory
            read_exactly(
                path,
                t.offset,
                raw.data,
                f"{path} ends inside tensor {t.name}: the file is truncated",
            )
            weights = dequantize(raw, t.tensor_type)
            out = processor.process(
                weights=weights, name=t.name, tensor_key_mapping=mapping, parsed_parameters=parsed
            )
            return torch.from_numpy(np.copy(out.weights))

        return cls(names, read)


class _GgufTensor(NamedTuple):
    """One GGUF tensor's place in its file: name, ggml type, byte offset, and the numpy dtype and
    shape gguf-py reads its bytes as (raw bytes per row for block-quantized types)."""

    name: str
    tensor_type: Any
    offset: int
    dtype: Any
    shape: tuple[int, ...]


def _gguf_has_new_loader(arch: str) -> bool:
    """transformers >= 5.x loads some GGUF architectures through weight converters instead of
    the per-tensor processors used here; those are loaded whole."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:
        return False
    return bool(is_gguf_arch_supported(arch))


def _leaves(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool]]:
    """(full name, owner, leaf name, is_parameter) of every parameter and persistent buffer."""
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        pre = f"{mod_name}." if mod_name else ""
        for leaf, p in mod._parameters.items():
            if p is not None:
                yield pre + leaf, mod, leaf, True
        for leaf, b in mod._buffers.items():
            if b is not None and leaf not in mod._non_persistent_buffers_set:
                yield pre + leaf, mod, leaf, False


class LayerStreamer:
    """Materializes the parameters of a module of the skeleton from the source, and releases them.

    Values are read in the source's stored dtype and cast to the skeleton parameter's dtype, as
    `from_pretrained` does.
    """

    def __init__(self, model: nn.Module, tensors: SourceTensors) -> None:
        self.model = model
        self.tensors = tensors
        self.stack_name, self.stack = find_decoder_layers(model)

    def materialize(self, module: nn.Module, prefix: str, *, skip: set[int] | None = None) -> None:
        """Read every meta parameter (and persistent buffer) of `module` named `prefix.<name>`."""
        for name, owner, leaf, is_param in _leaves(module):
            current = owner._parameters[leaf] if is_param else owner._buffers[leaf]
            assert current is not None
            if not current.is_meta or (skip and id(owner) in skip):
                continue
            full = f"{prefix}.{name}" if prefix else name
            value = self.tensors.get(full).to(current.dtype)
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(
                    f"--model: {full} is {list(value.shape)} in the source but the config implies "
                    f"{list(current.shape)}: the config does not match the weights; fix it"
                )
            if is_param:
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[leaf] = value

    def load_outside(self, *, with_output: bool) -> None:
        """Everything outside the decoder stack; the output embedding (lm_head) only if asked,
        since calibration never runs it (tied to the input embedding it comes along anyway)."""
        out_emb = self.model.get_output_embeddings()  # type: ignore[operator]
        skip = {id(m) for m in self.stack.modules()} | {id(out_emb)}
        self.materialize(self.model, "", skip=skip)
        self.model.tie_weights()  # type: ignore[operator]
        if with_output and out_emb is not None:
            name = next(n for n, m in self.model.named_modules() if m is out_emb)
            self.materialize(out_emb, name)

    def load_layer(self, i: int, layer: nn.Module) -> None:
        self.materialize(layer, f"{self.stack_name}.{i}")


def _skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    # Parameters on meta; buffers (rotary frequencies) real, computed as from_pretrained does.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _generation_config(src: ModelSource, config: Any) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(src.path, **src.kwargs())
    except (OSError, ValueError):
        return GenerationConfig.from_model_config(config)


def open_model(src: ModelSource, config: Any) -> tuple[nn.Module, LayerStreamer | None]:
    """The model to quantize, and its streamer; (the whole model, None) when it cannot stream."""
    path = Path(src.path).expanduser()
    tensors: SourceTensors | None = None
    if path.is_dir():
        skeleton = _skeleton(config, compute_dtype(src, config))
        if src.gguf_file:
            tensors = SourceTensors.gguf(path / src.gguf_file, skeleton)
        else:
            tensors = SourceTensors.safetensors(path)
        missing = [] if tensors is None else _missing(skeleton, tensors)
        if tensors is not None and not missing:
            skeleton.generation_config = _generation_config(src, config)
            streamer = LayerStreamer(skeleton, tensors)
            streamer.load_outside(with_output=False)
            return skeleton, streamer
        logger.info(
            "loading %s whole: %s",
            src.label,
            f"its tensor names differ from the model's ({missing[0]})"
            if missing
            else "its format cannot be read one tensor at a time",
        )
    return load_model(src), None


def _missing(skeleton: nn.Module, tensors: SourceTensors) -> list[str]:
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {})
    if not tied and getattr(skeleton.config, "tie_word_embeddings", False):
        out = skeleton.get_output_embeddings()  # type: ignore[operator]
        tied = {f"{n}.weight" for n, m in skeleton.named_modules() if m is out}
    return [n for n, *_ in _leaves(skeleton) if n not in tensors and n not in tied]
