"""Where each decoder layer comes from and where it goes during a run.

`LayerStore` reads a layer from the source before it is quantized (`source.LayerStreamer`; a
no-op for a model loaded whole), writes its finished tensors to the run's journal
(`checkpoint.journal`) and releases them, so memory holds one decoder layer at a time. For a
resumed run it hands the pipeline the layers an earlier run finished, whose quantized weights
are decoded from the journal instead of being quantized again. A linear whose checkpoint
tensors do not decode to exactly the weight the run continued with (GPTQT's BCQ coefficients are
fp16-rounded; the run continues with the b0-bit reading) also gets that weight in the journal,
under a name the checkpoint leaves out, so a resumed run replays the same activations.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.hf import checkpoint_tensors
from ..checkpoint.journal import SPILL_DIR, Journal
from ..checkpoint.tensorfile import TensorInfo, tensor_info
from ..format.bcq import BCQTensors
from ..format.gptq import TENSOR_NAMES, GPTQLayer
from ..models import ModelSource, decoder_linears, find_decoder_layers
from . import heap
from .options import QuantizeOptions
from .source import LayerStreamer

__all__ = ["LayerStore", "journal_key"]

# Settings that do not change any layer's bytes: where the result goes, how it is sharded at the
# end, and how much memory the activation streams may use (spilling is exact).
_NOT_IN_KEY = {"output", "overwrite", "resume", "max_shard_size", "max_memory", "device"}
# Journal-only tensors: the weight a linear was left with, when its checkpoint tensors do not
# decode to it exactly.
REPLAY_SUFFIX = ".replay_weight"


def _source_files(src: ModelSource) -> list[list[Any]]:
    path = Path(src.path).expanduser()
    if not path.is_dir():
        return []
    files = [path / src.gguf_file] if src.gguf_file else sorted(path.glob("*.safetensors"))
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def journal_key(
    opts: QuantizeOptions, windows: torch.Tensor, src: ModelSource, layers: int, version: str
) -> dict[str, Any]:
    """What a journal's layers depend on; a resume must match it exactly (JSON-comparable)."""
    key: dict[str, Any] = {
        f.name: getattr(opts, f.name) for f in fields(opts) if f.name not in _NOT_IN_KEY
    }
    key["device_type"] = torch.device(opts.device).type
    ids = windows.to(torch.int64).contiguous()
    key["calibration"] = hashlib.sha256(
        json.dumps(list(ids.shape)).encode() + ids.numpy().tobytes()
    ).hexdigest()
    key["source"] = src.label
    key["source_files"] = _source_files(src)
    key["decoder_layers"] = layers
    key["version"] = version
    return json.loads(json.dumps(key))  # as it reads back from the journal (lists, not tuples)


class LayerStore:
    """Decoder layers in and out of memory, through the source and the journal."""

    def __init__(
        self,
        model: nn.Module,
        journal: Journal,
        streamer: LayerStreamer | None,
        opts: QuantizeOptions,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.journal = journal
        self.streamer = streamer
        self.opts = opts
        self.dtype = dtype
        self.stack_name, self.stack = find_decoder_layers(model)
        # The first layer this run quantizes; the ones before it were finished by earlier runs.
        self.resume_at = journal.done

    @property
    def spill_dir(self) -> Path:
        """Where activation streams over --max-memory go: inside the run's partial directory."""
        return self.journal.directory / SPILL_DIR

    def load(self, i: int, layer: nn.Module) -> None:
        if self.streamer is not None:
            self.streamer.load_layer(i, layer)

    def stats(self, i: int) -> dict[str, dict[str, float]]:
        return dict(self.journal.layers[i]["stats"])

    def finished(self, i: int) -> dict[str, torch.Tensor] | None:
        """The quantized weights [N, K] of layer i's linears by name within the layer, as the
        earlier run that finished it left them; None if no earlier run did."""
        if i >= self.resume_at:
            return None
        tensors = self.journal.read_layer(i)
        prefix = f"{self.stack_name}.{i}."
        o = self.opts
        out = {}
        for name in decoder_linears(self.stack[i]):
            if prefix + name + REPLAY_SUFFIX in tensors:
                out[name] = tensors[prefix + name + REPLAY_SUFFIX]
                continue
            qweight, qzeros, scales, g_idx = (tensors[f"{prefix}{name}.{t}"] for t in TENSOR_NAMES)
            packed = GPTQLayer(
                qweight, qzeros, scales, g_idx, o.stored_bits, o.group_size, o.checkpoint_format
            )
            # The same values the run continued with: scales are fp16 in both, and the decode
            # is the same product.
            out[name] = packed.dequantize(torch.float32).t().contiguous()
        return out

    def store(
        self,
        i: int,
        layer: nn.Module,
        packed: dict[str, GPTQLayer | BCQTensors],
        stats: dict[str, dict[str, float]],
    ) -> None:
        """Write layer i's tensors (packed linears; norms and biases in the storage dtype) to the
        journal, then release all of them: the layer file is where they live now."""
        prefix = f"{self.stack_name}.{i}."
        if i >= self.resume_at:
            full = {prefix + n: p for n, p in packed.items()}
            tensors = checkpoint_tensors(layer, full, self.dtype, prefix=prefix)
            linears = decoder_linears(layer)
            for n, linear_packed in packed.items():
                if isinstance(linear_packed, BCQTensors):
                    w = linears[n].weight.detach()
                    tensors[prefix + n + REPLAY_SUFFIX] = w.to("cpu").contiguous().clone()
            self.journal.write_layer(i, tensors, stats)
        for mod in layer.modules():
            for leaf, p in mod._parameters.items():
                if p is not None and not p.is_meta:
                    mod._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)
        heap.trim()  # the layer's freed memory back to the OS, not left in the heap

    def checkpoint_tensors(
        self, packed: Mapping[str, GPTQLayer | BCQTensors]
    ) -> Mapping[str, torch.Tensor]:
        """Every tensor of the checkpoint: the ones outside the decoder stack from the model (its
        embeddings, final norm, lm_head, or the head's `packed` tensors when it was quantized),
        the layers' from the journal, read lazily."""
        outside = checkpoint_tensors(self.model, packed, self.dtype, exclude=f"{self.stack_name}.")
        return _Union(outside, self.journal.layer_files())


def _in_checkpoint(key: str) -> bool:
    return not key.endswith(REPLAY_SUFFIX)


class _Union(Mapping[str, torch.Tensor]):
    def __init__(self, first: dict[str, torch.Tensor], second: Any) -> None:
        self.first, self.second = first, second

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.first[key] if key in self.first else self.second[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.first
        yield from (k for k in self.second if k not in self.first and _in_checkpoint(k))

    def __len__(self) -> int:
        return len(set(self.first) | {k for k in self.second if _in_checkpoint(k)})

    def info(self, key: str) -> TensorInfo:
        return tensor_info(self.first[key]) if key in self.first else self.second.info(key)
