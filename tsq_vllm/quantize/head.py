"""The output head (lm_head) as one more linear to quantize, after the decoder stack
(`--quantize-lm-head`).

Its calibration input is what it reads in the model: the decoder stack's output through the final
norm (and whatever else the architecture puts between the two). `head_moments` gets exactly that
without knowing the architecture: it runs the model on each calibration batch with every decoder
layer skipped and the last one returning the stack output the streams already computed, and stops
at lm_head's input. Both streams go through it, so stage 2's error feedback sees the head's
quantized-vs-full-precision input like any other linear's.

A tied head shares its weight with the input embedding; quantizing it must not quantize the
embedding, so `untie_head` gives the head its own copy first and records the untying in the config
(`tie_word_embeddings=false`), which the checkpoint then says to every loader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core.hessian import HessianAccumulator
from .streams import ActivationStreams, InputMoments, Stream, _move_outside

__all__ = ["find_head", "head_moments", "untie_head"]


class _Stop(Exception):
    """Raised in lm_head's pre-hook: the rest of the forward pass is not needed."""


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(module name, module) of the model's output head; ValueError unless it is an nn.Linear."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"--quantize-lm-head: {type(model).__name__} has no nn.Linear output head "
            f"(get_output_embeddings() is {type(head).__name__}): quantize without "
            "--quantize-lm-head"
        )
    name = next(n for n, m in model.named_modules() if m is head)
    return name, head


def untie_head(model: nn.Module, head: nn.Linear) -> bool:
    """Give `head` its own weight if it shares the input embedding's; True if it did."""
    getter = getattr(model, "get_input_embeddings", None)
    embed = getter() if callable(getter) else None
    tied = getattr(embed, "weight", None) is head.weight
    if tied:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    # The checkpoint must say the head is its own tensor, or loaders would tie it back.
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    return tied


def _head_inputs(
    model: nn.Module,
    stack: nn.ModuleList,
    head: nn.Linear,
    input_ids: torch.Tensor,
    outputs: Stream,
    batch_size: int,
    device: torch.device,
) -> list[torch.Tensor]:
    """lm_head's input per batch when the stack's output on batch b is `outputs[b]`."""
    last = len(stack) - 1
    current: list[torch.Tensor] = []

    def layer_forward(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if i == last:
                return current[0]
            return args[0] if args else kwargs["hidden_states"]  # skipped

        return forward

    seen: list[torch.Tensor] = []

    def stop_at_input(_m: nn.Module, a: tuple[torch.Tensor, ...]) -> None:
        seen.append(a[0].detach())
        raise _Stop

    _move_outside(model, stack, device)
    handle = head.register_forward_pre_hook(stop_at_input)
    try:
        for i, layer in enumerate(stack):
            layer.forward = layer_forward(i)  # an instance attribute shadows the class's forward
        for b, b0 in enumerate(range(0, input_ids.shape[0], batch_size)):
            current[:] = [outputs[b]]
            try:
                model(input_ids=input_ids[b0 : b0 + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
        for layer in stack:
            layer.__dict__.pop("forward", None)
        _move_outside(model, stack, torch.device("cpu"))
    if len(seen) != len(outputs):
        raise RuntimeError(f"{type(model).__name__} did not call its output head on every batch")
    return seen


def head_moments(
    model: nn.Module,
    stack: nn.ModuleList,
    head: nn.Linear,
    input_ids: torch.Tensor,
    streams: ActivationStreams,
    batch_size: int,
) -> InputMoments:
    """H (and R, D with the FP stream) of lm_head's input, after the whole stack was quantized."""
    device = streams.device
    xs = _head_inputs(model, stack, head, input_ids, streams.hidden_q, batch_size, device)
    xs_fp: list[torch.Tensor | None] = [None] * len(xs)
    if streams.with_fp:
        xs_fp = list(
            _head_inputs(model, stack, head, input_ids, streams.hidden_fp, batch_size, device)
        )
    acc = HessianAccumulator(
        head.in_features, with_r=streams.with_fp, device=device, dtype=streams.accumulate_dtype
    )
    for x, x_fp in zip(xs, xs_fp, strict=True):
        acc.add(x, x_fp)
    return InputMoments(*acc.take())  # on the compute device, like the decoder linears' moments
