"""`quantization_config`: the JSON that GPTQ tools and vLLM read from a checkpoint.

`config.json["quantization_config"]` and `quantize_config.json` hold the same object:

  {"quant_method": "tsq", "bits": 3, "group_size": 64, "sym": false, "desc_act": false,
   "checkpoint_format": "gptq", "damp_percent": 0.01, "static_groups": true,
   "true_sequential": true, "lm_head": false,
   "tsq": {"stage1": true, "stage2": true, "error_feedback": true, ...}}

The GPTQ fields mean what they mean for AutoGPTQ/GPTQModel; the `tsq` block records how the
scales were found (stage settings, calibration data, tool version) and is opaque to them.
`checkpoint_format: "bcq"` (GPTQT, `format/bcq.py`) stores binary coding instead: `bits` is the
number of bit-planes k, and only tsq reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .bcq import BCQ_FORMAT, BCQ_TENSOR_NAMES, BCQTensors
from .gptq import CHECKPOINT_FORMATS, TENSOR_NAMES, GPTQLayer
from .packing import SUPPORTED_BITS

__all__ = [
    "STORED_FORMATS",
    "QUANT_METHOD",
    "SUPPORTED_GROUP_SIZES",
    "INTEGRITY_KEY",
    "FINGERPRINT_FIELDS",
    "CheckpointQuantConfig",
]

QUANT_METHOD = "tsq"
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# tsq.integrity (written by tsq_vllm.checkpoint.integrity) records these fields as packed, so that
# a hand-edited one is caught here, without hashing the weight files.
INTEGRITY_KEY = "integrity"
STORED_FORMATS = (*CHECKPOINT_FORMATS, BCQ_FORMAT)
_BCQ_BITS = (1, 2, 3, 4)
FINGERPRINT_FIELDS = ("checkpoint_format", "bits", "group_size", "sym")


@dataclass
class CheckpointQuantConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    desc_act: bool = False
    checkpoint_format: str = "gptq"
    damp_percent: float = 0.01
    quant_method: str = QUANT_METHOD
    static_groups: bool = True
    true_sequential: bool = True
    lm_head: bool = False
    tsq: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.checkpoint_format == BCQ_FORMAT:
            if self.bits not in _BCQ_BITS:
                raise ValueError(
                    f"bits={self.bits} is not a number of BCQ bit-planes: use one of {_BCQ_BITS}"
                )
            if self.quant_method != QUANT_METHOD:
                raise ValueError(
                    f"checkpoint_format='bcq' needs quant_method='tsq', got {self.quant_method!r}"
                )
        elif self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported: use one of {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size={self.group_size} is not supported: use one of {SUPPORTED_GROUP_SIZES}"
            )
        if self.checkpoint_format not in STORED_FORMATS:
            raise ValueError(
                f"checkpoint_format={self.checkpoint_format!r} is not supported: "
                f"use one of {STORED_FORMATS}"
            )
        if not 0.0 <= self.damp_percent < 1.0:
            raise ValueError(f"damp_percent={self.damp_percent} must lie in [0, 1)")
        if self.quant_method not in (QUANT_METHOD, "gptq"):
            raise ValueError(f"quant_method={self.quant_method!r}: expected 'tsq' or 'gptq'")
        self._check_fingerprint()

    def _check_fingerprint(self) -> None:
        """The format fields must be the ones the writer recorded: a flipped checkpoint_format loads
        wrong weights."""
        block = self.tsq.get(INTEGRITY_KEY) if isinstance(self.tsq, dict) else None
        if not isinstance(block, dict):
            return  # other GPTQ tools record none: accepted unverified
        for name in FINGERPRINT_FIELDS:
            if name in block and block[name] != getattr(self, name):
                raise ValueError(
                    f"{name}={getattr(self, name)!r} differs from {name}={block[name]!r} recorded "
                    "in tsq.integrity when the tensors were written: restore "
                    f"{name}={block[name]!r} (the tensors were packed that way) or re-quantize"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def is_bcq(self) -> bool:
        return self.checkpoint_format == BCQ_FORMAT

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The tensors stored per quantized linear; the first one marks a quantized linear."""
        return BCQ_TENSOR_NAMES if self.is_bcq else TENSOR_NAMES

    @property
    def required_tensor_names(self) -> tuple[str, ...]:
        """Those a quantized linear must have (a BCQ layer without g_idx has k // G groups)."""
        return BCQ_TENSOR_NAMES[:3] if self.is_bcq else TENSOR_NAMES

    def read_bcq_layer(
        self, tensors: Mapping[str, torch.Tensor], prefix: str, in_features: int, out_features: int
    ) -> BCQTensors:
        """As `read_layer`, for a BCQ layer (`tensors` by BCQ_TENSOR_NAMES; g_idx may be absent)."""
        g_idx = tensors.get("g_idx")
        try:
            if g_idx is not None and g_idx.dtype == torch.int64:
                g_idx = g_idx.to(torch.int32)
            layer = BCQTensors(
                tensors["bcq_bits"], tensors["bcq_alpha"], tensors["bcq_offset"], g_idx
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"corrupt checkpoint: {prefix}: {e}") from None
        if layer.bits != self.bits or (
            g_idx is None and layer.n_groups * self.group_size != layer.K
        ):
            raise ValueError(
                f"corrupt checkpoint: {prefix} holds {layer.bits} bit-planes in {layer.n_groups} "
                f"groups for K={layer.K}, but the config says bits={self.bits}, "
                f"group_size={self.group_size}; re-quantize or fix the config"
            )
        if (layer.K, layer.N) != (in_features, out_features):
            raise ValueError(
                f"corrupt checkpoint: {prefix} holds a layer with K={layer.K}, N={layer.N}, but "
                f"the model's linear has in_features={in_features}, out_features={out_features}; "
                "re-quantize or fix the config"
            )
        return layer

    def read_layer(
        self, tensors: Mapping[str, torch.Tensor], prefix: str, in_features: int, out_features: int
    ) -> GPTQLayer:
        """The stored layer `prefix` (`tensors` by TENSOR_NAMES) of the model's linear of that
        shape,
        checked whole, or one ValueError starting "corrupt checkpoint: " and naming the layer.

        Both loaders (`load_quantized` and the launcher's pre-check) read layers through this, so a
        checkpoint is refused with the same line wherever it is met.
        """
        qweight, qzeros, scales, g_idx = (tensors[name] for name in TENSOR_NAMES)
        try:
            layer = GPTQLayer(
                qweight, qzeros, scales, g_idx, self.bits, self.group_size, self.checkpoint_format
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"corrupt checkpoint: {prefix}: {e}") from None
        if g_idx.dtype != torch.int32:  # other GPTQ tools store int64; the kernels take int32
            layer = replace(layer, g_idx=g_idx.to(torch.int32))
        if (layer.K, layer.N) != (in_features, out_features):
            raise ValueError(
                f"corrupt checkpoint: {prefix} holds a layer with K={layer.K}, N={layer.N} at "
                f"{self.bits} bits, but the model's linear has in_features={in_features}, "
                f"out_features={out_features}; re-quantize or fix the config"
            )
        try:
            layer.check_values(prefix)
        except ValueError as e:
            raise ValueError(f"corrupt checkpoint: {e}") from None
        return layer

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointQuantConfig:
        """Read a tsq or GPTQ `quantization_config`; unknown GPTQ-tool keys are ignored."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        # GPTQModel writes "format"; AutoGPTQ may omit it (v1).
        if "checkpoint_format" not in d and "format" in d:
            kwargs["checkpoint_format"] = d["format"]
        if "damp_percent" not in d:
            kwargs.pop("damp_percent", None)
        for name in ("bits", "group_size"):
            if name not in d:
                # A default would decode every weight with the wrong layout, silently.
                raise ValueError(
                    f"quantization_config has no {name!r}: add the {name} the checkpoint was "
                    f'quantized with (e.g. "{name}": {getattr(cls, name)})'
                )
        kwargs["group_size"] = int(kwargs["group_size"])
        return cls(**kwargs)
