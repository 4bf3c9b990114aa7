"""Whole-model quantization: decoder layer by decoder layer, linear group by linear group.

Per decoder layer, its nn.Linear modules are grouped by identical input tensor (q/k/v; then o;
then gate/up; then down in Llama-like blocks) in execution order, found by running the layer
once with hooks, so no architecture table is needed. Groups are quantized in that order ("true
sequential"): each group's inputs are recomputed through the layer with the earlier groups
already quantized; with --refine-block the block's scales are then refined together, and the
layer is packed. The activation streams (quantized and full precision) and their capture and
replay live in `streams`; this module is the per-layer loop.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.hessian import RowFeedback
from ..models import decoder_linears, find_decoder_layers
from .checks import check_finite as _check_finite
from .checks import check_positive as _check_positive
from .checks import log_linear as _log_linear
from .head import find_head, head_moments, untie_head
from .layer import LinearInput, QuantizedWeight, prepare_input
from .layer_store import LayerStore
from .method import PackedLinear, QuantizedLinear, quantize_linear
from .options import QuantizeOptions
from .refine import refine_block
from .row_blocks import row_blocks
from .scheme import BlockRefineScheme, LayerScheme
from .streams import FP_CACHE_BYTES, ActivationStreams, InputMoments, input_groups

__all__ = [
    "FP_CACHE_BYTES",
    "QuantizeResult",
    "quantize_head",
    "quantize_model",
    "input_groups",
]

logger = logging.getLogger("tsq_vllm.quantize")


@dataclass
class QuantizeResult:
    """Packed tensors and statistics of every quantized linear, by full module name.

    The model passed to `quantize_model` is changed in place: every quantized linear's weight is
    the dequantized weight, so the model itself is the in-memory quantized model (for a BCQ
    checkpoint: the b0-bit reading, which its decode equals up to fp16 rounding).
    """

    packed: dict[str, PackedLinear] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0


def _set_quantized(linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor]) -> None:
    """Give a layer finished by an earlier run the weights it was left with (`LayerStore.finished`
    gives exactly those values)."""
    for name, weight in weights.items():
        w = linears[name].weight
        w.data = weight.to(device=w.device, dtype=w.dtype)


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
    """Quantize every decoder linear of `model` in place, calibrated on `input_ids` [n, L]; with
    `opts.quantize_lm_head` the output head too, after the stack (`quantize_head`).

    `opts` supplies the layer scheme, device and checkpoint format. With error feedback, one
    layer's full-precision linear inputs are kept for all windows when they fit in
    `fp_cache_bytes`; otherwise they are recomputed per group from a copy of the layer.
    With a `store`, each decoder layer is read from it before it is quantized and handed back
    once done (written to the run's journal and released; `result.packed` then holds only the
    head), and the layers an earlier run finished are replayed, not quantized again.
    """
    start = time.perf_counter()
    device = torch.device(opts.device)
    scheme = opts.layer_scheme()
    refine = opts.refine_scheme()
    stack_name, stack = find_decoder_layers(model)
    with_r = opts.error_feedback and (opts.stage2 or opts.gptaq_alpha > 0 or refine.steps > 0)
    result = QuantizeResult(tokens=int(input_ids.numel()))
    resume_at = store.resume_at if store is not None else 0
    if store is not None:
        for i in range(resume_at):
            result.stats.update(store.stats(i))
    if resume_at == len(stack) and not opts.quantize_lm_head:
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
        _quantize_stack(stack_name, stack, streams, opts, scheme, refine, result, store, progress)
        if opts.quantize_lm_head:
            # After a resume too: the replayed streams are bit-identical, so is the head.
            quantize_head(model, stack, input_ids, streams, scheme, opts, result)
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
    refine: BlockRefineScheme,
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
            _quantize_layer(f"{stack_name}.{i}", i, layer, streams, opts, scheme, refine, result)
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
    i: int,
    layer: nn.Module,
    streams: ActivationStreams,
    opts: QuantizeOptions,
    scheme: LayerScheme,
    refine: BlockRefineScheme,
    result: QuantizeResult,
) -> None:
    """Quantize one decoder layer's linears group by group, in place (true sequential), refine
    the block's scales if asked, then pack."""
    linears = decoder_linears(layer)
    qws: dict[str, QuantizedLinear] = {}
    for group in streams.begin_layer(i, layer):
        # One preparation (permutation, damping, factorizations) per input, shared by the group;
        # released when the group is done.
        readers = sum(len(row_blocks(*linears[n].weight.shape)) for n in group)
        weights = (
            [linears[n].weight for n in group] if _per_linear(group, linears, scheme) else None
        )
        m = streams.hessian(group[0], weights)
        inp = _prepare_input(f"{prefix}.{group[0]}", m, scheme, readers, streams.device, group)
        del m
        for name in group:
            qws[name] = _quantize_linear_in_place(
                f"{prefix}.{name}", linears[name], inp.reader(name)
            )
        del inp
    if refine.steps:
        tsq_qws = {n: qw for n, qw in qws.items() if isinstance(qw, QuantizedWeight)}
        assert len(tsq_qws) == len(qws), "--refine-block is a tsq mode (options check it)"
        qws = dict(refine_block(layer, tsq_qws, streams.block_batches(), refine, i))
        for name, qw in qws.items():
            _check_finite(f"{prefix}.{name}", "scales", qw.scales)
    for name, qw in qws.items():
        _pack(f"{prefix}.{name}", qw, scheme, opts, result)


def quantize_head(
    model: nn.Module,
    stack: nn.ModuleList,
    input_ids: torch.Tensor,
    streams: ActivationStreams,
    scheme: LayerScheme,
    opts: QuantizeOptions,
    result: QuantizeResult,
) -> None:
    """Quantize lm_head like a decoder linear, after the stack (`--quantize-lm-head`).

    Calibrated on its real input, the final-norm hidden states of both streams (`head_moments`);
    a head tied to the input embedding is untied first, so the embedding stays full precision.
    """
    name, head = find_head(model)
    if untie_head(model, head):
        logger.info("%s: untied from the input embedding, which stays in full precision", name)
    m = head_moments(model, stack, head, input_ids, streams, opts.batch_size)
    # A vocabulary-wide head is quantized in row blocks, each one read of its input.
    readers = len(row_blocks(*head.weight.shape))
    inp = _prepare_input(name, m, scheme, readers, streams.device)
    qw = _quantize_linear_in_place(name, head, inp)
    _pack(name, qw, scheme, opts, result)


def _per_linear(group: list[str], linears: dict[str, nn.Linear], scheme: LayerScheme) -> bool:
    """Whether the FP stream's terms are cheaper through the group's weights than as R and D.

    Per linear: 2·T·K·N multiply-adds (ΔX Wᵀ, then its product with X), against R's and D's
    T·K² each for the whole group, all in float32: break-even at ΣN = K. The weights are taken
    below 3K/4, which is down_proj (N = hidden, K = intermediate) in every decoder this runs on,
    where they also avoid two K×K matrices. tsq only: GPTQT's conversion reads R itself.
    """
    K = linears[group[0]].in_features
    return scheme.method == "tsq" and 4 * sum(linears[n].out_features for n in group) < 3 * K


def _prepare_input(
    name: str,
    m: InputMoments,
    scheme: LayerScheme,
    readers: int,
    device: torch.device,
    group: list[str] | None = None,
) -> LinearInput:
    """The checked moments of one input, prepared once for the `readers` linears that read it
    (`group`, in the order of the moments' per-linear feedback, when there is one).

    The tsq math runs on the compute `device`; GPTQT's conversion (`core.gptqt`) on CPU tensors.
    """
    math_device = torch.device("cpu") if scheme.method == "gptqt" else device
    H, R, D = (None if t is None else t.to(math_device) for t in m[:3])
    for t in (H, R, D):
        if t is not None:
            _check_finite(name, "inputs", t)
    assert H is not None
    feedback = None
    if m.feedback is not None:
        assert group is not None and len(group) == len(m.feedback)
        feedback = {}
        for n, fb in zip(group, m.feedback, strict=True):
            fb = RowFeedback(fb.WR.to(math_device), fb.w_d_w.to(math_device))
            _check_finite(name, "inputs", fb.WR)
            _check_finite(name, "inputs", fb.w_d_w)
            feedback[n] = fb
    return prepare_input(H, scheme, R, D, readers=readers, feedback=feedback)


def _quantize_linear_in_place(name: str, lin: nn.Linear, inp: LinearInput) -> QuantizedLinear:
    """Quantize one linear on its prepared input, checked; its weight becomes the dequantized one
    (so later groups and layers see the quantized output)."""
    _check_finite(name, "weight", lin.weight)
    qw = quantize_linear(lin.weight.detach().float().to(inp.H.device), inp)
    _check_finite(name, "scales", qw.scales)  # before later groups see its output
    # GPTQT's b0-bit reading s (x - z), not its BCQ decode (which rounds the coefficients to
    # fp16): both of its checkpoint formats then hold the same codes.
    lin.weight.data = qw.dequantize().to(device=lin.weight.device, dtype=lin.weight.dtype)
    return qw


def _pack(
    name: str,
    qw: QuantizedLinear,
    scheme: LayerScheme,
    opts: QuantizeOptions,
    result: QuantizeResult,
) -> None:
    """The packed tensors (value-checked) and statistics of one quantized linear into `result`."""
    _check_positive(name, qw.scales, boxed=scheme.scale_box > 0 or not scheme.stage2)
    packed = qw.pack(opts.checkpoint_format)
    packed.check_values(name)
    result.packed[name] = packed
    result.stats[name] = dict(qw.stats)
    _log_linear(name, qw.stats)
