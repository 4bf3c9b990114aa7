"""Whole-model quantization: decoder layer by decoder layer, linear group by linear group.

Two activation streams run side by side over the calibration windows:

  quantized stream  X   through the layers quantized so far: H = E[X Xᵀ] is taken from it
  FP stream         X̃   through the untouched full-precision layers: R = E[(X − X̃) Xᵀ] needs it

Per decoder layer, its nn.Linear modules are grouped by identical input tensor (q/k/v; then o;
then gate/up; then down in Llama-like blocks) in execution order, found by running the layer
once with hooks, so no architecture table is needed. Groups are quantized in that order ("true
sequential"): each group's inputs are recomputed through the layer with the earlier groups
already quantized. A forward hook on the group's first linear stops the forward as soon as its
input is known, so recomputing costs only the part of the layer in front of the group.

The inputs of the first decoder layer, and every layer's keyword arguments (attention masks,
position embeddings: whatever transformers passes), are recorded once by swapping each layer's
forward for a recorder, so the embeddings run on the calibration tokens exactly once and
per-layer masks (sliding-window layers) come out right. Only the layer being quantized (and, when
its full-precision inputs are too big to keep, a full-precision copy of it) is on the compute device.

The FP stream needs no recomputation: before a layer is quantized it is still full precision, so
one pass over the windows yields both the FP stream's next input and every group's X̃.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..core.hessian import HessianAccumulator
from ..format.gptq import GPTQTensors
from .layer import quantize_weight
from .options import QuantizeOptions
from .source import decoder_linears, find_decoder_layers

__all__ = ["FP_CACHE_BYTES", "QuantizeResult", "quantize_model", "input_groups"]

FP_CACHE_BYTES = 2 * 2**30

logger = logging.getLogger("tsq_vllm.quantize")


@dataclass
class QuantizeResult:
    """Packed tensors and statistics of every quantized linear, by full module name.

    The model passed to `quantize_model` is changed in place: every quantized linear's weight is
    the dequantized weight, so the model itself is the in-memory quantized model.
    """

    packed: dict[str, GPTQTensors] = field(default_factory=dict)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once what it was run for is known."""


@dataclass
class _Call:
    """How one decoder layer was called on one batch, minus the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_positional: bool

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_positional:
            out = layer(hidden, *self.args, **self.kwargs)
        else:
            out = layer(hidden_states=hidden, **self.kwargs)
        # transformers 5 decoder layers return a tensor, 4.x ones a tuple led by it.
        return out[0] if isinstance(out, (tuple, list)) else out


def _move_outside(model: nn.Module, stack: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the decoder stack (embeddings, norms)."""
    inside = {id(m) for m in stack.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for p in mod._parameters.values():
            if p is not None:
                p.data = p.data.to(device)  # keeps tied parameters tied: the Parameter object is shared
        for k, b in mod._buffers.items():
            if b is not None:
                mod._buffers[k] = b.to(device)


def _record_layer_calls(
    model: nn.Module, stack: nn.ModuleList, input_ids: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[list[torch.Tensor], list[list[_Call]]]:
    """First-layer inputs per batch, and how every layer is called per batch ([layer][batch])."""
    hidden: list[torch.Tensor] = []
    calls: list[list[_Call]] = [[] for _ in stack]
    last = len(stack) - 1

    def recorder(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            positional = bool(args)
            h = args[0] if positional else kwargs.pop("hidden_states")
            if i == 0:
                hidden.append(h.detach())
            calls[i].append(_Call(tuple(args[1:]), kwargs, positional))
            if i == last:
                raise _Stop
            return h  # the layers are skipped: only their arguments are wanted

        return forward

    _move_outside(model, stack, device)
    try:
        for i, layer in enumerate(stack):
            layer.forward = recorder(i)  # an instance attribute shadows the class's forward
        for b0 in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids=input_ids[b0 : b0 + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for layer in stack:
            layer.__dict__.pop("forward", None)
        _move_outside(model, stack, torch.device("cpu"))
    if len(hidden) != len(calls[last]) or not hidden:
        raise RuntimeError(
            f"{type(model).__name__} did not call all {len(stack)} decoder layers in order on each batch: "
            "this architecture is not supported by the sequential pipeline"
        )
    return hidden, calls


def _run_hooked(
    layer: nn.Module,
    linears: dict[str, nn.Module],
    hidden: torch.Tensor,
    call: _Call,
    on_input: Callable[[str, torch.Tensor], None],
) -> torch.Tensor | None:
    """Run `layer` on `hidden`, calling `on_input(name, x)` as each of `linears` receives x.

    Returns the layer's output, or None when `on_input` ended the pass by raising `_Stop`.
    """
    handles = [lin.register_forward_pre_hook(lambda _m, a, n=n: on_input(n, a[0])) for n, lin in linears.items()]
    try:
        return call.run(layer, hidden)
    except _Stop:
        return None
    finally:
        for h in handles:
            h.remove()


def _capture_input(layer: nn.Module, linear: nn.Module, hidden: torch.Tensor, call: _Call) -> torch.Tensor:
    """The input of `linear` when `layer` runs on `hidden`; the rest of the layer is skipped."""
    seen: list[torch.Tensor] = []

    def stop_at_input(_name: str, x: torch.Tensor) -> None:
        seen.append(x.detach())
        raise _Stop

    _run_hooked(layer, {"": linear}, hidden, call, stop_at_input)
    if not seen:
        raise RuntimeError(f"{type(linear).__name__} was not called when its decoder layer ran")
    return seen[0]


def _run_capturing(
    layer: nn.Module, names: list[str], hidden: torch.Tensor, call: _Call
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The layer's output on `hidden`, and the inputs of its linears named in `names`."""
    linears = decoder_linears(layer)
    seen: dict[str, torch.Tensor] = {}
    out = _run_hooked(layer, {n: linears[n] for n in names}, hidden, call, lambda n, x: seen.setdefault(n, x.detach()))
    assert out is not None  # nothing raises _Stop here
    return out, seen


def input_groups(layer: nn.Module, hidden: torch.Tensor, call: _Call) -> list[list[str]]:
    """The layer's linears grouped by identical input, groups in execution order.

    Identical means the same memory (data pointer, shape, strides): q/k/v all read the one normed
    hidden state, gate/up the other. A linear that does not run on the probe batch is an error,
    since it could not get a Hessian.
    """
    linears = decoder_linears(layer)
    order: list[tuple[str, tuple[Any, ...]]] = []
    keep: list[torch.Tensor] = []  # holds the inputs so their memory is not reused mid-probe

    def record(name: str, x: torch.Tensor) -> None:
        keep.append(x)
        order.append((name, (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype)))

    _run_hooked(layer, linears, hidden, call, record)
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, key in order:
        members = groups.setdefault(key, [])
        if name not in members:
            members.append(name)
    missing = set(linears) - {n for n, _ in order}
    if missing:
        raise RuntimeError(f"linear layers {sorted(missing)} never ran on the calibration data: cannot quantize them")
    return list(groups.values())


def _log_linear(name: str, stats: dict[str, float]) -> None:
    # rel error = E‖QX − WX̃‖² / E‖WX̃‖² (the true eq. (7), constant included); energy = E‖QX‖² / E‖WX̃‖².
    quality = ""
    if "rel_error" in stats:
        quality = (
            f"rel error {stats['rel_error_gptq']:.4g} -> {stats['rel_error']:.4g}, output energy "
            f"{stats['energy_ratio_gptq']:.3f} -> {stats['energy_ratio']:.3f} after stage 2; "
        )
    logger.info(
        "%s: %sgrid %.2fs, gptq %.2fs, stage2 %.2fs",
        name, quality, stats["time_grid"], stats["time_gptq"], stats["time_stage2"],
    )


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    input_ids: torch.Tensor,
    opts: QuantizeOptions,
    *,
    progress: bool = False,
    fp_cache_bytes: int = FP_CACHE_BYTES,
) -> QuantizeResult:
    """Quantize every decoder linear of `model` (on CPU) in place, calibrated on `input_ids` [n, L].

    `opts` supplies bits, group size, stage switches, damp, device and checkpoint format.
    With error feedback, one layer's full-precision linear inputs are kept for all windows when
    they fit in `fp_cache_bytes`; otherwise they are recomputed per group from a copy of the
    layer (same values, more compute, bounded memory).
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    device = torch.device(opts.device)
    stack_name, stack = find_decoder_layers(model)
    use_r = opts.error_feedback and (opts.stage2 or opts.gptaq_alpha > 0)
    result = QuantizeResult(tokens=int(input_ids.numel()))

    hidden_q, calls = _record_layer_calls(model, stack, input_ids, opts.batch_size, device)
    # Both streams start from the same embeddings; entries are replaced, never modified in place.
    hidden_fp = list(hidden_q) if use_r else []
    logger.info(
        "calibration: %d windows x %d tokens, %d decoder layers, error feedback %s",
        input_ids.shape[0], input_ids.shape[1], len(stack), "on" if use_r else "off",
    )

    for i in tqdm(range(len(stack)), desc="quantizing", unit="layer", disable=not progress):
        layer = stack[i].to(device)
        linears = decoder_linears(layer)
        groups = input_groups(layer, hidden_q[0], calls[i][0])
        firsts = [g[0] for g in groups]  # a group's members share their input
        fp_inputs: list[dict[str, torch.Tensor]] | None = None
        fp_layer: nn.Module | None = None
        if use_r:
            need = result.tokens * sum(linears[f].in_features for f in firsts) * hidden_fp[0].element_size()
            if need <= fp_cache_bytes:
                # The layer is still full precision: one pass gives the FP stream's next input and
                # every group's X̃, instead of recomputing X̃ once per group.
                fp_inputs = []
                for b, call in enumerate(calls[i]):
                    hidden_fp[b], xs = _run_capturing(layer, firsts, hidden_fp[b], call)
                    fp_inputs.append(xs)
            else:
                fp_layer = copy.deepcopy(layer)
        fp_linears = decoder_linears(fp_layer) if fp_layer is not None else {}
        for group in groups:
            first = group[0]
            acc = HessianAccumulator(linears[first].in_features, with_r=use_r, device=device)
            for b, call in enumerate(calls[i]):
                x = _capture_input(layer, linears[first], hidden_q[b], call)  # [b, L, K]
                if fp_inputs is not None:
                    x_fp = fp_inputs[b].pop(first)  # freed once used
                elif fp_layer is not None:
                    x_fp = _capture_input(fp_layer, fp_linears[first], hidden_fp[b], call)
                else:
                    x_fp = None
                acc.add(x, x_fp)
            H, R = acc.finalize()
            # The core math runs on CPU tensors; only the forward passes use the compute device.
            H = H.cpu()
            R = R.cpu() if R is not None else None
            D = acc.finalize_delta()
            D = D.cpu() if D is not None else None
            for name in group:
                lin = linears[name]
                qw = quantize_weight(
                    lin.weight.detach().float().cpu(),
                    H,
                    bits=opts.bits,
                    group_size=opts.group_size,
                    sym=opts.sym,
                    stage1=opts.stage1,
                    stage2=opts.stage2,
                    R=R,
                    damp=opts.damp,
                    act_order=opts.act_order,
                    gptq=opts.gptq,
                    scale_search=opts.scale_search,
                    mse_norm=opts.mse_norm,
                    clip_points=opts.clip_points,
                    zero_min=opts.zero_min,
                    D=D,
                    error_feedback_alpha=opts.error_feedback_alpha,
                    scale_box=opts.scale_box or None,
                    energy_match=opts.energy_match,
                    gptaq_alpha=opts.gptaq_alpha,
                )
                full = f"{stack_name}.{i}.{name}"
                lin.weight.data = qw.dequantize().to(device=lin.weight.device, dtype=lin.weight.dtype)
                result.packed[full] = qw.to_gptq(opts.checkpoint_format)
                result.stats[full] = dict(qw.stats)
                _log_linear(full, qw.stats)
        for b, call in enumerate(calls[i]):
            hidden_q[b] = call.run(layer, hidden_q[b])
            if fp_layer is not None:
                hidden_fp[b] = call.run(fp_layer, hidden_fp[b])
        layer.to("cpu")
        del fp_layer, fp_inputs
    result.seconds = time.perf_counter() - start
    return result
