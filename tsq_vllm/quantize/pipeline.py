"""Whole-model quantization: decoder layer by decoder layer, linear group by linear group.

Per decoder layer, its nn.Linear modules are grouped by identical input tensor (q/k/v; then o;
then gate/up; then down in Llama-like blocks) in execution order, found by running the layer
once with hooks, so no architecture table is needed. Groups are quantized in that order ("true
sequential"): each group's inputs are recomputed through the layer with the earlier groups
already quantized. The activation streams (quantized and full precision) and their capture
and replay live in `streams`; this module is the per-layer loop.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..format.gptq import GPTQLayer
from ..models import decoder_linears, find_decoder_layers
from .layer import quantize_weight
from .layer_store import LayerStore
from .options import QuantizeOptions
from .scheme import LayerScheme
from .streams import FP_CACHE_BYTES, ActivationStreams, input_groups

__all__ = ["FP_CACHE_BYTES", "QuantizeResult", "quantize_model", "input_groups"]

logger = logging.getLogger("tsq_vllm.quantize")


@dataclass
class QuantizeResult:
    """Packed tensors and statistics of every quantized linear, by full module name.

    The model passed to `quantize_model` is changed in place: every quantized linear's weight is
    the dequantized weight, so the model itself is the in-memory quantized model.
    """

    packed: dict[str, GPTQLayer] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0


_NON_FINITE = {
    "weight": "the weight contains {bad} NaN/inf value(s) of {n}: the source model is corrupt; "
    "re-download or re-export it",
    "inputs": "its calibration inputs contain NaN/inf (the embeddings or layers in front of it "
    "give non-finite activations): the source model is corrupt; re-download or re-export it",
    "scales": "quantizing gave {bad} NaN/inf scale(s), which are never written: retry with "
    "--no-stage2 or a larger --damp",
}


def _check_finite(name: str, what: str, t: torch.Tensor) -> None:
    """A NaN/inf would otherwise surface as a meaningless packing or Cholesky error, or be
    written."""
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{name}: " + _NON_FINITE[what].format(bad=bad, n=t.numel()))


def _check_positive(name: str, scales: torch.Tensor, boxed: bool) -> None:
    """The paper requires s > 0; the scale box guarantees it, so a negative one there is a bug.

    (A scale that fp16 rounds to 0 belongs to a group of weights below fp16's range: harmless.)

    Only the unbounded ablation (--scale-box 0) may flip a scale's sign: that is written, with a
    warning, because it is what the ablation measures.
    """
    bad = int((scales < 0).sum())
    if not bad:
        return
    if boxed:
        raise ValueError(
            f"{name}: {bad} of {scales.numel()} scales are negative although stage 2 "
            f"kept them in its box: this is a bug; retry with --no-stage2 and report it"
        )
    logger.warning(
        "%s: %d of %d scales are negative (--scale-box 0 leaves stage 2 unbounded)",
        name,
        bad,
        scales.numel(),
    )


def _log_linear(name: str, stats: dict[str, float]) -> None:
    # rel error = E‖QX − WX̃‖² / E‖WX̃‖² (the true eq. (7), constant included); energy = E‖QX‖² /
    # E‖WX̃‖².
    quality = ""
    if "rel_error" in stats:
        quality = (
            f"rel error {stats['rel_error_gptq']:.4g} -> {stats['rel_error']:.4g}, output energy "
            f"{stats['energy_ratio_gptq']:.3f} -> {stats['energy_ratio']:.3f} after stage 2; "
        )
    logger.info(
        "%s: %sgrid %.2fs, gptq %.2fs, stage2 %.2fs",
        name,
        quality,
        stats["time_grid"],
        stats["time_gptq"],
        stats["time_stage2"],
    )


def _set_quantized(linears: dict[str, nn.Linear], packed: dict[str, GPTQLayer]) -> None:
    """Give a layer finished by an earlier run the weights it was left with (the same values:
    scales are fp16 in both, and the decode is the same product)."""
    for name, layer in packed.items():
        w = linears[name].weight
        w.data = layer.dequantize(torch.float32).t().contiguous().to(device=w.device, dtype=w.dtype)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    input_ids: torch.Tensor,
    opts: QuantizeOptions,
    *,
    progress: bool = False,
    fp_cache_bytes: int = FP_CACHE_BYTES,
    store: LayerStore | None = None,
) -> QuantizeResult:
    """Quantize every decoder linear of `model` (on CPU) in place, calibrated on `input_ids` [n, L].

    `opts` supplies the layer scheme, device and checkpoint format. With error feedback, one
    layer's full-precision linear inputs are kept for all windows when they fit in
    `fp_cache_bytes`; otherwise they are recomputed per group from a copy of the layer.
    With a `store`, each decoder layer is read from it before it is quantized and handed back
    once done (written to the run's journal and released; `result.packed` then stays empty), and
    the layers an earlier run finished are replayed, not quantized again.
    """
    start = time.perf_counter()
    device = torch.device(opts.device)
    scheme = opts.layer_scheme()
    stack_name, stack = find_decoder_layers(model)
    with_r = opts.error_feedback and (opts.stage2 or opts.gptaq_alpha > 0)
    result = QuantizeResult(tokens=int(input_ids.numel()))
    resume_at = store.resume_at if store is not None else 0
    if store is not None:
        for i in range(resume_at):
            result.stats.update(store.stats(i))
    if resume_at == len(stack):
        return result  # an earlier run finished every layer: nothing to replay
    logger.info(
        "calibration: %d windows x %d tokens, %d decoder layers, error feedback %s%s",
        input_ids.shape[0],
        input_ids.shape[1],
        len(stack),
        "on" if with_r else "off",
        f"; resuming after layer {resume_at - 1}" if resume_at else "",
    )
    streams = ActivationStreams(
        model,
        stack,
        input_ids,
        batch_size=opts.batch_size,
        device=device,
        with_fp=with_r,
        fp_cache_bytes=fp_cache_bytes,
        accumulate_dtype=scheme.math_dtype,
        max_memory=opts.max_memory_bytes,
        spill_dir=store.spill_dir if store is not None else None,
    )
    try:
        _quantize_stack(stack_name, stack, streams, opts, scheme, result, store, progress)
    finally:
        streams.close()
    result.seconds = time.perf_counter() - start
    return result


def _quantize_stack(
    stack_name: str,
    stack: nn.ModuleList,
    streams: ActivationStreams,
    opts: QuantizeOptions,
    scheme: LayerScheme,
    result: QuantizeResult,
    store: LayerStore | None,
    progress: bool,
) -> None:
    """Every decoder layer in order: quantized, or replayed when an earlier run finished it."""
    from tqdm.auto import tqdm

    for i in tqdm(range(len(stack)), desc="quantizing", unit="layer", disable=not progress):
        if store is not None:
            store.load(i, stack[i])
        layer = stack[i].to(streams.device)
        linears = decoder_linears(layer)
        finished = store.finished(i) if store is not None else None
        if finished is not None:
            streams.replay_layer(i, layer, functools.partial(_set_quantized, linears, finished))
        else:
            _quantize_layer(
                f"{stack_name}.{i}",
                layer,
                streams.begin_layer(i, layer),
                streams,
                opts,
                scheme,
                result,
            )
            streams.end_layer()
        layer.to("cpu")
        if store is not None:
            prefix = f"{stack_name}.{i}."
            store.store(
                i,
                layer,
                {n: result.packed.pop(prefix + n) for n in linears if prefix + n in result.packed},
                {prefix + n: result.stats[prefix + n] for n in linears},
            )


def _quantize_layer(
    prefix: str,
    layer: nn.Module,
    groups: list[list[str]],
    streams: ActivationStreams,
    opts: QuantizeOptions,
    scheme: LayerScheme,
    result: QuantizeResult,
) -> None:
    """Quantize one decoder layer's linears group by group, in place (true sequential)."""
    linears = decoder_linears(layer)
    for group in groups:
        m = streams.hessian(group[0])
        for t in (m.H, m.R, m.D):
            if t is not None:
                _check_finite(f"{prefix}.{group[0]}", "inputs", t)
        for name in group:
            lin, full = linears[name], f"{prefix}.{name}"
            _check_finite(full, "weight", lin.weight)
            qw = quantize_weight(lin.weight.detach().float(), m.H, scheme, R=m.R, D=m.D)
            lin.weight.data = qw.dequantize().to(device=lin.weight.device, dtype=lin.weight.dtype)
            _check_finite(full, "scales", qw.scales)
            _check_positive(full, qw.scales, boxed=scheme.scale_box > 0 or not scheme.stage2)
            result.packed[full] = qw.to_gptq(opts.checkpoint_format)
            result.packed[full].check_values(full)
            result.stats[full] = dict(qw.stats)
            _log_linear(full, qw.stats)
