"""The two calibration activation streams through a decoder stack, and the hooks that feed them.

  quantized stream  X   through the layers quantized so far: H = E[X Xᵀ] is taken from it
  FP stream         X̃   through the untouched full-precision layers: R = E[(X − X̃) Xᵀ] needs it

`ActivationStreams` records the first layer's inputs and every layer's call arguments once
(attention masks, position embeddings: whatever transformers passes) by swapping each layer's
forward for a recorder, so the embeddings run on the calibration tokens exactly once and
per-layer masks (sliding-window layers) come out right. Per decoder layer it then captures the
inputs of one group of linears at a time (a forward hook stops the pass as soon as the input is
known, so recomputing costs only the part of the layer in front of the group), and replays the
layer to advance both streams.

The FP stream needs no recomputation: before a layer is quantized it is still full precision, so
one pass over the windows yields both the FP stream's next input and every group's X̃. When
those inputs are too big to keep (`fp_cache_bytes`), a full-precision copy of the layer
recomputes them per group instead (same values, more compute, bounded memory).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, overload

import torch
from torch import nn

from ..core.hessian import HessianAccumulator, RowFeedback
from ..models import decoder_linears
from .spill import StreamSpill

__all__ = ["FP_CACHE_BYTES", "ActivationStreams", "BlockBatch", "InputMoments", "input_groups"]

FP_CACHE_BYTES = 2 * 2**30

logger = logging.getLogger("tsq_vllm.quantize")


class Stream(Protocol):
    """One activation stream: a tensor per calibration batch (a list, or a `SpilledStream`)."""

    def __len__(self) -> int: ...
    def __getitem__(self, b: int, /) -> torch.Tensor: ...
    def __setitem__(self, b: int, t: torch.Tensor, /) -> None: ...


class InputMoments(NamedTuple):
    """Second moments of one linear's input [K, K]: H = E[X Xᵀ]; with the FP stream also
    R = E[(X − X̃) Xᵀ] (stage 2's error feedback) and D = E[ΔX ΔXᵀ] (the true eq. (7) and FP
    energy), or instead their terms through each reading linear's weight (`feedback`, in the
    order the weights were given; see `core.hessian.RowFeedback`)."""

    H: torch.Tensor
    R: torch.Tensor | None
    D: torch.Tensor | None
    feedback: list[RowFeedback] | None = None


class BlockBatch(NamedTuple):
    """One calibration batch of the current decoder layer: its quantized-stream input, the
    full-precision layer's output on the FP-stream input (the block-reconstruction target), and
    how the layer is called on it."""

    hidden: torch.Tensor
    target: torch.Tensor
    call: _Call


class _BlockBatches(Sequence[BlockBatch]):
    """The block batches of one layer, read from the streams on access: a spilled stream hands
    out one batch at a time, so `--max-memory` holds during `--refine-block` too."""

    def __init__(self, hidden: Stream, target: Stream, calls: Sequence[_Call]) -> None:
        self._hidden, self._target, self._calls = hidden, target, calls

    def __len__(self) -> int:
        return len(self._calls)

    @overload
    def __getitem__(self, b: int) -> BlockBatch: ...
    @overload
    def __getitem__(self, b: slice) -> Sequence[BlockBatch]: ...
    def __getitem__(self, b: int | slice) -> BlockBatch | Sequence[BlockBatch]:
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(len(self)))]
        return BlockBatch(self._hidden[b], self._target[b], self._calls[b])


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once what it was run for is known."""


@dataclass
class _Call:
    """How one decoder layer was called on one batch, minus the hidden states."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_positional: bool

    def run(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The layer's output on `hidden`; `weights` (parameter name -> tensor) stand in for
        those parameters of the layer for this call only, differentiably."""
        args, kwargs = (hidden, *self.args), dict(self.kwargs)
        if not self.hidden_positional:
            args, kwargs = (), {"hidden_states": hidden, **kwargs}
        if weights is None:
            out = layer(*args, **kwargs)
        else:
            out = torch.func.functional_call(layer, dict(weights), args, kwargs)
        # transformers 5 decoder layers return a tensor, 4.x ones a tuple led by it.
        return out[0] if isinstance(out, (tuple, list)) else out


def _move_outside(model: nn.Module, stack: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the decoder stack (embeddings, norms)."""
    inside = {id(m) for m in stack.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for p in mod._parameters.values():
            if p is not None and not p.is_meta:  # a streamed skeleton's unread lm_head
                p.data = p.data.to(
                    device
                )  # keeps tied parameters tied: the Parameter object is shared
        for k, b in mod._buffers.items():
            if b is not None and not b.is_meta:
                mod._buffers[k] = b.to(device)


def _record_layer_calls(
    model: nn.Module,
    stack: nn.ModuleList,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
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
            f"{type(model).__name__} did not call all {len(stack)} decoder layers in order on "
            "each batch: this architecture is not supported by the sequential pipeline"
        )
    return hidden, calls


def _run_hooked(
    layer: nn.Module,
    linears: Mapping[str, nn.Module],
    hidden: torch.Tensor,
    call: _Call,
    on_input: Callable[[str, torch.Tensor], object],
) -> torch.Tensor | None:
    """Run `layer` on `hidden`, calling `on_input(name, x)` as each of `linears` receives x.

    Returns the layer's output, or None when `on_input` ended the pass by raising `_Stop`.
    """
    handles = [
        lin.register_forward_pre_hook(lambda _m, a, n=n: on_input(n, a[0]))
        for n, lin in linears.items()
    ]
    try:
        return call.run(layer, hidden)
    except _Stop:
        return None
    finally:
        for h in handles:
            h.remove()


def _capture_input(
    layer: nn.Module, linear: nn.Module, hidden: torch.Tensor, call: _Call
) -> torch.Tensor:
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
    out = _run_hooked(
        layer,
        {n: linears[n] for n in names},
        hidden,
        call,
        lambda n, x: seen.setdefault(n, x.detach()),
    )
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
        raise RuntimeError(
            f"linear layers {sorted(missing)} never ran on the calibration data: cannot quantize "
            "them"
        )
    return list(groups.values())


class ActivationStreams:
    """Both streams over the calibration windows, advanced one decoder layer at a time.

    Per layer: `begin_layer` (on the compute device, still full precision), then `hessian` per
    group of linears in `groups` order (after the earlier groups were quantized in place), then
    `end_layer` to replay the quantized (and the FP) layer into the next layer's inputs.
    """

    def __init__(
        self,
        model: nn.Module,
        stack: nn.ModuleList,
        input_ids: torch.Tensor,
        *,
        batch_size: int,
        device: torch.device,
        with_fp: bool,
        fp_cache_bytes: int = FP_CACHE_BYTES,
        accumulate_dtype: torch.dtype = torch.float64,
        max_memory: int | None = None,
        spill_dir: Path | None = None,
    ) -> None:
        self.device = device
        self.accumulate_dtype = accumulate_dtype
        self.with_fp = with_fp
        self.fp_cache_bytes = fp_cache_bytes
        self.tokens = int(input_ids.numel())
        hidden, self.calls = _record_layer_calls(model, stack, input_ids, batch_size, device)
        # Both streams start from the same embeddings; entries are replaced, never modified in
        # place.
        self.hidden_q: Stream = hidden
        self.hidden_fp: Stream = list(hidden) if with_fp else []
        self._spill = StreamSpill(spill_dir)
        if max_memory is not None:
            # The streams (the quantized one first) and the FP input cache within the budget.
            spilled, left = self._spill.fit(hidden, ("q", "fp") if with_fp else ("q",), max_memory)
            self.hidden_q = spilled.get("q", self.hidden_q)
            self.hidden_fp = spilled.get("fp", self.hidden_fp)
            self.fp_cache_bytes = min(self.fp_cache_bytes, left)
        self._layer: nn.Module | None = None
        self._i = -1
        self.groups: list[list[str]] = []
        self._fp_inputs: list[dict[str, torch.Tensor]] | None = None
        self._fp_layer: nn.Module | None = None
        self._fp_advanced = False  # hidden_fp already holds this layer's FP outputs

    def close(self) -> None:
        """Remove the spill files."""
        self._spill.close()

    def begin_layer(self, i: int, layer: nn.Module) -> list[list[str]]:
        """Start decoder layer i (full precision, on the device); returns its groups of linears."""
        self._i, self._layer = i, layer
        calls = self.calls[i]
        linears = decoder_linears(layer)
        self.groups = input_groups(layer, self.hidden_q[0], calls[0])
        self._fp_inputs, self._fp_layer, self._fp_advanced = None, None, False
        if self.with_fp:
            firsts = [g[0] for g in self.groups]  # a group's members share their input
            need = (
                self.tokens
                * sum(linears[f].in_features for f in firsts)
                * self.hidden_fp[0].element_size()
            )
            if need <= self.fp_cache_bytes:
                # The layer is still full precision: one pass gives the FP stream's next input and
                # every group's X̃, instead of recomputing X̃ once per group.
                self._fp_inputs = []
                for b, call in enumerate(calls):
                    self.hidden_fp[b], xs = _run_capturing(layer, firsts, self.hidden_fp[b], call)
                    self._fp_inputs.append(xs)
                self._fp_advanced = True
            else:
                self._fp_layer = copy.deepcopy(layer)
        return self.groups

    def hessian(self, first: str, weights: Sequence[torch.Tensor] | None = None) -> InputMoments:
        """H (and R, D with the FP stream) of the input of linear `first`, on the compute device;
        with `weights` (the full-precision weights of the linears reading it) the FP stream's
        terms through each of them instead of R and D."""
        layer = self._layer
        assert layer is not None, "begin_layer first"
        assert self._fp_layer is None or not self._fp_advanced, "hessian after block_batches"
        lin = decoder_linears(layer)[first]
        fp_lin = decoder_linears(self._fp_layer)[first] if self._fp_layer is not None else None
        acc = HessianAccumulator(
            lin.in_features,
            with_r=self.with_fp,
            weights=weights if self.with_fp else None,
            device=self.device,
            dtype=self.accumulate_dtype,
        )
        for b, call in enumerate(self.calls[self._i]):
            x = _capture_input(layer, lin, self.hidden_q[b], call)  # [b, L, K]
            if self._fp_inputs is not None:
                x_fp = self._fp_inputs[b].pop(first)  # freed once used
            elif self._fp_layer is not None and fp_lin is not None:
                x_fp = _capture_input(self._fp_layer, fp_lin, self.hidden_fp[b], call)
            else:
                x_fp = None
            acc.add(x, x_fp)
        # On the compute device, like the math; the accumulators are released as they go, the
        # float32 weight copies of the per-linear terms first (0.2 GiB for an 8B down_proj).
        feedback = acc.take_feedback()
        return InputMoments(*acc.take(), feedback=feedback)

    def replay_layer(self, i: int, layer: nn.Module, quantize: Callable[[], None]) -> None:
        """Advance both streams through decoder layer i, which an earlier run quantized: the FP
        stream through the layer as read from the source, then the quantized one after
        `quantize()` gave it its quantized weights. The same passes as `begin_layer` and
        `end_layer` make, so the streams come out bit-identical."""
        calls = self.calls[i]
        if self.with_fp:
            for b, call in enumerate(calls):
                self.hidden_fp[b] = call.run(layer, self.hidden_fp[b])
        quantize()
        for b, call in enumerate(calls):
            self.hidden_q[b] = call.run(layer, self.hidden_q[b])

    def block_batches(self) -> Sequence[BlockBatch]:
        """The current layer's quantized-stream inputs with the FP layer's outputs on the FP
        stream, per batch (needs the FP stream; call after every group's `hessian`)."""
        if not self.with_fp:
            raise RuntimeError("block_batches needs the full-precision stream (with_fp=True)")
        calls = self.calls[self._i]
        if not self._fp_advanced:
            assert self._fp_layer is not None, "begin_layer first"
            for b, call in enumerate(calls):
                self.hidden_fp[b] = call.run(self._fp_layer, self.hidden_fp[b])
            self._fp_advanced = True
        return _BlockBatches(self.hidden_q, self.hidden_fp, calls)

    def end_layer(self) -> None:
        """Replay the (now quantized) layer, and its FP copy, into the next layer's inputs."""
        layer = self._layer
        assert layer is not None, "begin_layer first"
        for b, call in enumerate(self.calls[self._i]):
            self.hidden_q[b] = call.run(layer, self.hidden_q[b])
            if self._fp_layer is not None and not self._fp_advanced:
                self.hidden_fp[b] = call.run(self._fp_layer, self.hidden_fp[b])
        self._layer, self._fp_layer, self._fp_inputs = None, None, None
