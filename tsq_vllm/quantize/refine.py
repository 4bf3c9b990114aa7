"""`--refine-block`: joint refinement of one decoder block's scales on the block output.

Runs after every linear group of the block went through the per-linear stages. The codes and
zero points stay as they are; the scales of all the block's linears move together to bring the
quantized block's output on the quantized stream closer to the full-precision block's output on
the full-precision stream (`core.blockopt` has the math). The block's weights are then the
dequantized refined weights, so the quantized stream that feeds the next layer sees them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ..core.blockopt import LogScales, refine_scales_block
from ..models import decoder_linears
from .layer import QuantizedWeight
from .scheme import BlockRefineScheme
from .streams import BlockBatch

__all__ = ["refine_block"]

logger = logging.getLogger("tsq_vllm.quantize")


def _batch_loss(layer: nn.Module, names: Sequence[str], batches: Sequence[BlockBatch]) -> object:
    dtype = next(layer.parameters()).dtype

    def loss(weights: Sequence[torch.Tensor], b: int) -> tuple[torch.Tensor, int]:
        hidden, target, call = batches[b]
        ws = {f"{n}.weight": w.to(dtype) for n, w in zip(names, weights, strict=True)}
        err = call.run(layer, hidden, ws).float() - target.float()
        return err.square().sum(), err.numel()

    return loss


def refine_block(
    layer: nn.Module,
    qws: dict[str, QuantizedWeight],
    batches: Sequence[BlockBatch],
    scheme: BlockRefineScheme,
    layer_index: int,
) -> dict[str, QuantizedWeight]:
    """The block's quantized weights with refined scales (codes and zeros unchanged); `layer`'s
    linears are set to the refined dequantized weights. Statistics of the block are added to
    each linear's stats: "refine_loss_start", "refine_loss", "refine_best_step", "time_refine".
    """
    t0 = time.perf_counter()
    names = list(qws)
    linears = decoder_linears(layer)
    device = next(layer.parameters()).device
    params = [
        LogScales.around(
            qws[n].scales.to(device),
            qws[n].grid_scales.to(device),
            (qws[n].codes - qws[n].zeros[:, qws[n].g_idx]).to(device),
            qws[n].g_idx.to(device),
            scheme.box,
        )
        for n in names
    ]
    grads = [p.requires_grad for p in layer.parameters()]
    for p in layer.parameters():
        p.requires_grad_(False)  # only θ is trained: no gradients for norms or biases
    try:
        out = refine_scales_block(
            params,
            _batch_loss(layer, names, batches),  # type: ignore[arg-type]
            scheme.order(layer_index, len(batches)),
            len(batches),
            lr=scheme.lr,
        )
    finally:
        for p, g in zip(layer.parameters(), grads, strict=True):
            p.requires_grad_(g)
    seconds = time.perf_counter() - t0
    refined: dict[str, QuantizedWeight] = {}
    for n, s in zip(names, out.scales, strict=True):
        # On the device of the other tensors of the weight (the compute device, see pipeline).
        scales = s.to(qws[n].codes.device).contiguous()
        qw = replace(qws[n], scales=scales, stats=dict(qws[n].stats))
        qw.stats.update(
            refine_loss_start=out.loss_start,
            refine_loss=out.loss,
            refine_best_step=float(out.best_step),
            time_refine=seconds,
        )
        lin = linears[n]
        lin.weight.data = qw.dequantize().to(device=lin.weight.device, dtype=lin.weight.dtype)
        refined[n] = qw
    change = 100 * (out.loss - out.loss_start) / out.loss_start if out.loss_start else 0.0
    logger.info(
        "layer %d block refine: loss %.4g -> %.4g (%+.1f %%), best at step %d of %d, %.1fs",
        layer_index,
        out.loss_start,
        out.loss,
        change,
        out.best_step,
        out.steps,
        seconds,
    )
    return refined
