"""CPU linear layers: the paths the vLLM plugin can serve a quantized layer with, side by side.

    .venv/bin/python benchmarks/bench_cpu_linear.py --output benchmarks/results/cpu_linear.md

For SmolLM2-135M's shapes (and one Llama-8B shape) and decode/prefill batch sizes, times
  dense fp32 / dense bf16   F.linear on an unquantized weight (the baselines)
  eager dequant + matmul    decoding the packed weight on every call (what not to do)
  int4 (tsq CPU path)       codes repacked once into aten's CPU int4 layout, bf16 activations
Medians of interleaved repetitions in one process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from tsq_vllm.format import pack_linear
from tsq_vllm.kernels.cpu import prepare_cpu_linear

SHAPES = [(576, 1536), (1536, 576), (576, 576), (4096, 4096)]


def _layer(K: int, N: int, bits: int, group: int):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 1 << bits, (N, K), generator=g)
    scales = torch.rand(N, K // group, generator=g) * 0.01 + 0.001
    zeros = torch.randint(1, 1 << bits, (N, K // group), generator=g)
    return pack_linear(codes, scales, zeros, torch.arange(K) // group, bits)


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    rows = [
        f"# CPU linear paths, INT{args.bits} g{args.group_size}",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_cpu_linear.py --bits {args.bits} --group-size "
        f"{args.group_size} --reps {args.reps}`; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        "median per call in ms.",
        "",
        "| K × N | M | dense fp32 | dense bf16 | eager dequant+mm (bf16) | tsq int4 (bf16) | int4 vs dense bf16 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for K, N in SHAPES:
        t = _layer(K, N, args.bits, args.group_size)
        w32 = t.dequantize(dtype=torch.float32).t().contiguous()
        w16 = w32.bfloat16()
        fast = prepare_cpu_linear(replace(t, g_idx=None), act_dtype=torch.bfloat16)
        for M in (1, 16, 128):
            x32 = torch.randn(M, K)
            x16 = x32.bfloat16()
            eager = lambda x16=x16, t=t: F.linear(x16, t.dequantize(dtype=torch.bfloat16).t())  # noqa: E731
            ms = {
                "fp32": _time(lambda x32=x32, w32=w32: F.linear(x32, w32), args.reps),
                "bf16": _time(lambda x16=x16, w16=w16: F.linear(x16, w16), args.reps),
                "eager": _time(eager, max(3, args.reps // 10)),
                "int4": _time(lambda fast=fast, x16=x16: fast(x16), args.reps),
            }
            rows.append(
                f"| {K} × {N} | {M} | {1e3 * ms['fp32']:.3f} | {1e3 * ms['bf16']:.3f} | {1e3 * ms['eager']:.2f} | "
                f"{1e3 * ms['int4']:.3f} | {ms['bf16'] / ms['int4']:.2f}× |"
            )
    text = "\n".join(rows) + "\n"
    sys.stdout.write(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
