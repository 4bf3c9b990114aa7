"""Launching the Triton dequant-matmul (`triton_jit`): validation, configuration, autotuning.

`launch` runs one kernel on x [M, K] for a `GPTQLayer`: `pick_config` chooses the kernel and its
tiles, or the autotuner does when enabled. `dequant_matmul_triton` is the entry point of
`tsq_vllm.kernels.op`. The decode and the kernels themselves are described in `triton_jit`.

Interpreter (TRITON_INTERPRET=1, CPU tensors): the kernels run on CPU tensors when `triton_jit`
was first imported with it set; autotuning needs a CPU timer there, so it is opt-in
(TSQ_TRITON_AUTOTUNE=1) and off under the interpreter.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import replace
from typing import Any

import torch
import triton

from ..format.gptq import GPTQLayer
from .configs import CONFIGS, GEMV_MAX_M, KernelConfig, fit_block_k, pick_config, split_plan
from .reference import check_input
from .triton_jit import _gemm_kernel, _gemv_kernel, _splitk_reduce_kernel

__all__ = [
    "CONFIGS",
    "GEMV_MAX_M",
    "KernelConfig",
    "is_interpreted",
    "autotune_enabled",
    "pick_config",
    "launch",
    "dequant_matmul_triton",
]

# ----------------------------------------------------------------------------------------------
# Configurations


def is_interpreted() -> bool:
    """True when this module's kernels were built by the Triton interpreter (TRITON_INTERPRET=1
    when the module was imported), so they run on CPU tensors."""
    return not isinstance(_gemm_kernel, triton.runtime.JITFunction)


def autotune_enabled() -> bool:
    """Autotuning is opt-in (TSQ_TRITON_AUTOTUNE=1) and never used by the interpreter."""
    return os.environ.get("TSQ_TRITON_AUTOTUNE", "0") == "1" and not is_interpreted()


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Autotuning candidates (GPU only). BLOCK_K candidates that do not fit G or K are pruned per call.
_GEMM_TUNE = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (32, 64, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (64, 128, 32, 4, 3),
    (128, 64, 32, 4, 3),
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 2),
    (128, 256, 32, 8, 3),
    (256, 128, 32, 8, 3),
]
_GEMV_TUNE = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (32, 32, 4, 3),
    (64, 32, 4, 3),
    (64, 64, 4, 3),
    (128, 32, 4, 3),
    (128, 64, 8, 3),
    (256, 32, 8, 2),
]


def _prune(configs, named_args, **kwargs):
    G, act = kwargs["GROUP_SIZE"], kwargs["ACT_ORDER"]
    k_step = named_args.get("K_PER_SPLIT", named_args["K"])  # every split must be whole K tiles
    keep = [
        c
        for c in configs
        if named_args["K"] % c.kwargs["BLOCK_K"] == 0
        and k_step % c.kwargs["BLOCK_K"] == 0
        and (act or G % c.kwargs["BLOCK_K"] == 0)
    ]
    return keep or [c for c in configs if c.kwargs["BLOCK_K"] == 32][:1]


def _cpu_bench(fn, quantiles=None):
    """Wall-clock timer for autotuning under the interpreter (tests only)."""
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


@functools.cache
def _tuned(kind: str):
    bench = _cpu_bench if is_interpreted() else None
    prune = {"early_config_prune": _prune}
    if kind == "gemm":
        configs = [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                num_warps=w,
                num_stages=s,
            )
            for bm, bn, bk, w, s in _GEMM_TUNE
        ]
        return triton.autotune(
            configs, key=["M_BUCKET", "N", "K"], prune_configs_by=prune, do_bench=bench
        )(_gemm_kernel)
    configs = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in _GEMV_TUNE
    ]
    return triton.autotune(
        configs, key=["M_BUCKET", "N", "K", "K_PER_SPLIT"], prune_configs_by=prune, do_bench=bench
    )(_gemv_kernel)


# ----------------------------------------------------------------------------------------------
# Launch


def launch(
    x: torch.Tensor,
    layer: GPTQLayer,
    *,
    config: KernelConfig | None = None,
    kind: str | None = None,
    autotune: bool | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Validate, pick a configuration and run one kernel on x [M, K]: y [M, N] (`out` if given).

    `config` fixes the launch (tests use it to force a path); otherwise `pick_config` chooses, or
    the autotuner when `autotune` (default: `autotune_enabled()`). `workspace` is the fp32
    [split_k, M, N] buffer of the GEMV (allocated when None).
    """
    p = check_input(x, layer)
    qweight, qzeros, scales, g_idx, bits = (
        layer.qweight,
        layer.qzeros,
        layer.scales,
        layer.g_idx,
        layer.bits,
    )
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"x has dtype {x.dtype}: the Triton kernels take float16 or bfloat16 activations; "
            "cast x"
        )
    if x.device.type == "cpu" and not is_interpreted():
        raise RuntimeError(
            "the Triton kernels got CPU tensors but were not built by the interpreter: set "
            "TRITON_INTERPRET=1 before tsq_vllm.kernels.triton_kernels is first imported, "
            "or use backend='torch'"
        )
    if out is None:
        out = torch.empty(p.M, p.N, device=x.device, dtype=x.dtype)
    elif out.shape != (p.M, p.N) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out is {out.dtype} {tuple(out.shape)} on {out.device}: "
            f"expected {x.dtype} [{p.M}, {p.N}]"
        )
    if p.M == 0 or p.N == 0:
        return out
    act_order = g_idx is not None
    if autotune is None:
        autotune = autotune_enabled() and config is None
    if config is None:
        sms = _sm_count(x.device.index or 0) if x.is_cuda else 8
        config = pick_config(p, act_order, kind, sm_count=sms, bits=bits)
    elif kind is not None and config.kind != kind:
        raise ValueError(f"config is for {config.kind!r} but kind={kind!r}")
    config = replace(config, block_k=fit_block_k(config.block_k, p.group_size, act_order))
    if p.K % config.block_k:
        raise ValueError(f"block_k={config.block_k} does not divide K={p.K}: use 32")

    # The act-order pointer must be a tensor even when unused; qweight stands in.
    g_arg = g_idx if act_order else qweight
    common = dict(
        BITS=bits,
        GROUP_SIZE=p.group_size,
        ZERO_OFFSET=layer.zero_offset,
        ACT_ORDER=act_order,
        DOT_F32=is_interpreted() and x.dtype == torch.bfloat16,
    )
    m_bucket = triton.next_power_of_2(max(p.M, 1))
    strides = (
        x.stride(0),
        x.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        qzeros.stride(0),
        qzeros.stride(1),
        scales.stride(0),
        scales.stride(1),
    )

    grid: Any  # a launch grid, or a callable of the autotuned meta-parameters
    args: tuple[Any, ...]
    if config.kind == "gemm":
        args = (
            x,
            qweight,
            qzeros,
            scales,
            g_arg,
            out,
            p.M,
            p.N,
            p.K,
            m_bucket,
            *strides,
            out.stride(0),
            out.stride(1),
        )
        if autotune:

            def tuned_grid(meta: dict[str, Any]) -> tuple[int]:
                return (triton.cdiv(p.M, meta["BLOCK_M"]) * triton.cdiv(p.N, meta["BLOCK_N"]),)

            _tuned("gemm")[tuned_grid](*args, **common)
        else:
            grid = (triton.cdiv(p.M, config.block_m) * triton.cdiv(p.N, config.block_n),)
            _gemm_kernel[grid](
                *args,
                **common,
                BLOCK_M=config.block_m,
                BLOCK_N=config.block_n,
                BLOCK_K=config.block_k,
                GROUP_M=config.group_m,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
        return out

    if p.M > GEMV_MAX_M:
        raise ValueError(
            f"M={p.M} is too large for the GEMV kernel (M <= {GEMV_MAX_M}): use kind='gemm'"
        )
    # Splits are planned in units of 64 (any tuned BLOCK_K divides it) when autotuning.
    unit = (
        64
        if autotune and p.K % 64 == 0 and (act_order or p.group_size % 64 == 0)
        else config.block_k
    )
    k_per_split, split = split_plan(p.K, unit, config.split_k)
    t_strides: tuple[int, ...]
    if split == 1:
        target, t_strides = out, (0, out.stride(0), out.stride(1))
    else:
        if workspace is None:
            workspace = torch.empty(split, p.M, p.N, device=x.device, dtype=torch.float32)
        elif (
            workspace.shape != (split, p.M, p.N)
            or workspace.dtype != torch.float32
            or not workspace.is_contiguous()
        ):
            raise ValueError(
                f"workspace is {workspace.dtype} {tuple(workspace.shape)}: expected contiguous "
                f"float32 [{split}, {p.M}, {p.N}]"
            )
        target, t_strides = workspace, workspace.stride()
    args = (
        x,
        qweight,
        qzeros,
        scales,
        g_arg,
        target,
        p.M,
        p.N,
        p.K,
        m_bucket,
        k_per_split,
        *strides,
        *t_strides,
    )
    if autotune:
        grid = lambda meta: (triton.cdiv(p.N, meta["BLOCK_N"]), split)  # noqa: E731
        _tuned("gemv")[grid](*args, **common)
    else:
        grid = (triton.cdiv(p.N, config.block_n), split)
        _gemv_kernel[grid](
            *args,
            **common,
            BLOCK_M=16,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(p.M * p.N, block),)](
            workspace, out, p.M, p.N, split, out.stride(0), out.stride(1), BLOCK=block
        )
    return out


def dequant_matmul_triton(
    x: torch.Tensor, layer: GPTQLayer, *, kind: str | None = None
) -> torch.Tensor:
    """y [..., N] = x [..., K] · W on the Triton kernels (CUDA, or CPU under the interpreter)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] and x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = launch(x2, layer, kind=kind)
    return y.reshape(*lead, y.shape[-1])
