"""vLLM linear method for BCQ (GPTQT) checkpoints: parameters, checked loading, CPU/CUDA apply.

`TsqConfig` picks it for `checkpoint_format: "bcq"`. Per layer (format/bcq.py), local shapes:

  bcq_bits    int32 [k, K/32, N]   input dim 1 (whole words), output dim 2
  bcq_alpha   fp16  [k, n_g, N]    input dim 1 (whole groups), output dim 2
  bcq_offset  fp16  [n_g, N]       input dim 0, output dim 1
  g_idx       int32 [K]            only with desc_act (act-order)

Column-parallel shards split N freely; row-parallel shards split K at whole groups. Act-order
on a row-parallel layer is refused (its local columns may name any group). Every checkpoint
tensor's dtype and full shape is checked before vLLM's narrow/copy, and every shard of a fused
layer must have arrived. After loading: CPU layers get `kernels.bcq.prepare_cpu_bcq`, CUDA
layers the `tsq::bcq_matmul` op (the Triton kernel).

Imports vLLM at module level, like `tsq_vllm.serve.linear`.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.parameter import (
    GroupQuantScaleParameter,
    ModelWeightParameter,
    RowvLLMParameter,
)

from ..format.bcq import BCQ_TENSOR_NAMES, BCQTensors
from .params import fused_shard_ids

__all__ = ["BCQLinearMethod"]


def _log_once(path: str, bcq: BCQTensors, act_dtype: torch.dtype, where: str) -> None:
    """One line per distinct (path, shape, dtype), through `kernels.backends.log_once` and worded
    like its backend choice, so that a server log names the CPU path of BCQ layers too."""
    from ..kernels.backends import log_once

    log_once(
        ("bcq", path, bcq.bits, bcq.K, bcq.N, bcq.n_groups, act_dtype),
        "tsq BCQ linear %d-bit g%d K=%d N=%d %s (e.g. %s): using bcq-%s backend",
        bcq.bits,
        bcq.K // bcq.n_groups,
        bcq.K,
        bcq.N,
        str(act_dtype).removeprefix("torch."),
        where or "?",
        path,
    )


class _BCQCheck:
    """Mixin: the checkpoint tensor's dtype and full shape before vLLM shards it; shards seen.

    Set after construction: `tsq_name`, `tsq_full` (full shape, None at the output dim),
    `tsq_int` (int32, else float), `tsq_out` (output dim or None).
    """

    tsq_name: str
    tsq_full: tuple[int | None, ...]
    tsq_int: bool
    tsq_out: int | None
    data: torch.Tensor
    tp_size: int

    def _check(self, w: torch.Tensor, out_full: int | None, shard: Any) -> None:
        where = self.tsq_name + ("" if shard is None else f" (shard {shard!r})")
        if (w.dtype == torch.int32) != self.tsq_int or not (self.tsq_int or w.is_floating_point()):
            want = "int32" if self.tsq_int else "a float dtype"
            raise ValueError(
                f"{where}: checkpoint tensor has dtype {w.dtype}, expected {want}: re-export it"
            )
        full = list(self.tsq_full)
        if self.tsq_out is not None:
            full[self.tsq_out] = out_full
        if w.dim() != len(full) or any(
            f is not None and s != f for s, f in zip(w.shape, full, strict=False)
        ):
            raise ValueError(
                f"{where}: checkpoint tensor has shape {tuple(w.shape)}, expected "
                f"{tuple('N' if f is None else f for f in full)}; the tensors do not match the "
                "checkpoint's quantization_config (bits, group_size) or the file is corrupt"
            )

    def _mark(self, shard: Any) -> None:
        seen: set[Any] | None = getattr(self, "tsq_loaded", None)
        if seen is None:
            seen = set()
            self.tsq_loaded = seen
        seen.add(shard)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        out = self.tsq_out
        self._check(
            loaded_weight, None if out is None else self.data.shape[out] * self.tp_size, None
        )
        super().load_column_parallel_weight(loaded_weight)  # type: ignore[misc]
        self._mark(None)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        out = self.tsq_out
        self._check(loaded_weight, None if out is None else self.data.shape[out], None)
        super().load_row_parallel_weight(loaded_weight)  # type: ignore[misc]
        self._mark(None)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kw: Any) -> None:
        size = kw.get("shard_size")
        self._check(
            loaded_weight, None if size is None else size * self.tp_size, kw.get("shard_id")
        )
        super().load_merged_column_weight(loaded_weight, **kw)  # type: ignore[misc]
        self._mark(kw.get("shard_id"))

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kw: Any) -> None:
        shard, size = kw.get("shard_id"), kw.get("shard_size")
        full = None
        if size is not None:
            full = size * self.tp_size // (1 if shard == "q" else kw.get("num_heads", 1))
        self._check(loaded_weight, full, shard)
        super().load_qkv_weight(loaded_weight, **kw)  # type: ignore[misc]
        self._mark(shard)


class _Weight(_BCQCheck, ModelWeightParameter):
    pass


class _Group(_BCQCheck, GroupQuantScaleParameter):
    pass


class _GIdx(_BCQCheck, RowvLLMParameter):
    pass


class BCQLinearMethod(LinearMethodBase):
    """BCQ linear: CPU paths (`kernels.bcq.prepare_cpu_bcq`) or the Triton kernel on CUDA."""

    def __init__(self, quant_config: Any, prefix: str = "") -> None:
        # quant_config: the `TsqConfig` (not imported: config imports this module).
        self.quant_config = quant_config
        self.prefix = prefix

    def create_weights(
        self,
        layer: Any,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        cfg = self.quant_config.spec
        k, G = cfg.bits, cfg.group_size
        k_local, n_local = input_size_per_partition, sum(output_partition_sizes)
        tp = int(getattr(layer, "tp_size", 1))
        if input_size % G or k_local % G:
            raise ValueError(
                f"{self.prefix}: in_features={input_size} (this shard {k_local}) is not a multiple "
                f"of group_size={G}: use a tensor-parallel size that splits whole groups"
            )
        if cfg.desc_act and k_local != input_size:
            raise ValueError(
                f"{self.prefix}: an act-order BCQ checkpoint cannot be split along in_features "
                f"(tensor-parallel size {tp}): serve it with tensor-parallel size 1"
            )
        loader = extra_weight_attrs.get("weight_loader")
        n_g = k_local // G
        scale_dtype = torch.float32 if params_dtype == torch.float32 else torch.float16
        params: dict[str, Any] = {
            "bcq_bits": _Weight(
                data=torch.empty(k, k_local // 32, n_local, dtype=torch.int32),
                input_dim=1,
                output_dim=2,
                weight_loader=loader,
            ),
            "bcq_alpha": _Group(
                data=torch.empty(k, n_g, n_local, dtype=scale_dtype),
                input_dim=1,
                output_dim=2,
                weight_loader=loader,
            ),
            "bcq_offset": _Group(
                data=torch.empty(n_g, n_local, dtype=scale_dtype),
                input_dim=0,
                output_dim=1,
                weight_loader=loader,
            ),
        }
        full = {
            "bcq_bits": (k, input_size // 32, None),
            "bcq_alpha": (k, input_size // G, None),
            "bcq_offset": (input_size // G, None),
        }
        if cfg.desc_act:
            params["g_idx"] = _GIdx(
                data=torch.empty(k_local, dtype=torch.int32), input_dim=0, weight_loader=loader
            )
            full["g_idx"] = (input_size,)
        for name, p in params.items():
            p.tsq_name = f"{self.prefix}.{name}" if self.prefix else name
            p.tsq_full = full[name]
            p.tsq_int = name in ("bcq_bits", "g_idx")
            p.tsq_out = None if name == "g_idx" else len(full[name]) - 1
            layer.register_parameter(name, p)
        layer.tsq_shard_ids = fused_shard_ids(layer, len(output_partition_sizes))

    def process_weights_after_loading(self, layer: Any) -> None:
        names = [n for n in BCQ_TENSOR_NAMES if hasattr(layer, n)]
        shard_ids = list(layer.tsq_shard_ids)
        parts = self.quant_config.shard_names(self.prefix, len(shard_ids))
        for name in names:
            seen: set[Any] = getattr(getattr(layer, name), "tsq_loaded", set())
            missing = [p for sid, p in zip(shard_ids, parts, strict=True) if sid not in seen]
            if missing:
                raise ValueError(
                    f"{', '.join(f'{m}.{name}' for m in missing)} missing from the checkpoint: "
                    "the BCQ checkpoint is incomplete: re-export it"
                )
        g_idx = layer.g_idx.data if hasattr(layer, "g_idx") else None
        try:
            bcq = BCQTensors(
                layer.bcq_bits.data, layer.bcq_alpha.data, layer.bcq_offset.data, g_idx
            )
        except ValueError as e:
            raise ValueError(f"corrupt checkpoint: {self.prefix}: {e}") from None
        if layer.bcq_bits.device.type == "cpu":
            from ..kernels.bcq import prepare_cpu_bcq

            layer.tsq_cpu = prepare_cpu_bcq(bcq, act_dtype=layer.params_dtype)
            _log_once(layer.tsq_cpu.path, bcq, layer.params_dtype, self.prefix)
            for name in names:  # the prepared copy serves; free the checkpoint tensors
                p = getattr(layer, name)
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        else:
            from ..kernels.bcq import register_bcq_op

            register_bcq_op()  # at load time: registering while torch.compile traces would break
            layer.tsq_bcq = bcq

    def apply(self, layer: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        prepared = getattr(layer, "tsq_cpu", None)
        if prepared is not None:
            return prepared(x, bias)
        from ..kernels.bcq import bcq_matmul_op

        y = bcq_matmul_op(x.reshape(-1, x.shape[-1]), layer.tsq_bcq)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])
