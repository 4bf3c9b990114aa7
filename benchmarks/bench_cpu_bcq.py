"""CPU paths for BCQ (GPTQT) linears, side by side: which one the plugin serves with.

    .venv/bin/python benchmarks/bench_cpu_bcq.py --output benchmarks/results/cpu_bcq.md

For SmolLM2-135M's layer shapes and one Llama-3-8B shape, decode batch sizes M = 1 and 16, k = 2
and 3 planes, group size 64, at one torch thread, the paths of `tsq_vllm.kernels.bcq`:
  dense fp32 / dense bf16   the reference decode once at load, then F.linear
  bit-plane GEMV (bf16)     the k ±1 planes held in bf16, one batched matmul per group
  int4 (bf16)               BCQ converted to b0 = 4 integer codes at load, aten's CPU int4 matmul
on layers whose levels lie on the 4-bit integer axis (as GPTQT's do). Every repetition runs every
path once, in turn, so the paths share the machine's load; the table holds medians in ms.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tsq_vllm.format.bcq import BCQTensors, pack_bcq  # noqa: E402
from tsq_vllm.kernels.bcq import prepare_cpu_bcq  # noqa: E402

SHAPES = [("SmolLM2-135M", 576, 576), ("SmolLM2-135M", 576, 1536), ("SmolLM2-135M", 1536, 576),
          ("Llama-3-8B", 4096, 4096)]  # fmt: skip
PATHS = ("dense fp32", "dense bf16", "bit-plane GEMV", "int4")


def make_layer(K: int, N: int, k: int, G: int, seed: int = 0) -> BCQTensors:
    """Levels s (m + Σ d_i β_i − z) on the 4-bit integer axis, as GPTQT writes them."""
    g = torch.Generator().manual_seed(seed)
    n_g = K // G
    d = torch.randint(0, 15 // k + 1, (N, n_g, k), generator=g).sort(-1, descending=True).values
    m = (torch.rand(N, n_g, generator=g) * (16 - d.sum(-1))).floor()
    s = (0.01 + 0.05 * torch.rand(N, n_g, generator=g)).half().float()
    z = torch.randint(1, 15, (N, n_g), generator=g).float()
    signs = (torch.randint(0, 2, (k, N, K), generator=g) * 2 - 1).to(torch.int8)
    return pack_bcq(signs, s[..., None] * d / 2, s * (m + d.sum(-1) / 2 - z))


def bench(K: int, N: int, k: int, M: int, reps: int) -> dict[str, float]:
    layer = make_layer(K, N, k, 64)
    prepared = {
        "dense fp32": prepare_cpu_bcq(layer, act_dtype=torch.float32, path="dense"),
        "dense bf16": prepare_cpu_bcq(layer, act_dtype=torch.bfloat16, path="dense"),
        "bit-plane GEMV": prepare_cpu_bcq(layer, act_dtype=torch.bfloat16, path="planes"),
        "int4": prepare_cpu_bcq(layer, act_dtype=torch.bfloat16, path="int4"),
    }
    assert prepared["int4"].path == "int4" and prepared["bit-plane GEMV"].path == "planes"
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    xs = {p: x.to(torch.float32 if p == "dense fp32" else torch.bfloat16) for p in PATHS}
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    inner = max(1, int(2e6 // (K * N)) + 1)  # enough calls per sample to time small layers
    for _ in range(reps):
        for p in PATHS:
            fn, xp = prepared[p], xs[p]
            fn(xp)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn(xp)
            times[p].append((time.perf_counter() - t0) * 1e3 / inner)
    return {p: statistics.median(v) for p, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--output")
    args = ap.parse_args()
    torch.set_num_threads(1)
    before = os.getloadavg()
    rows = [
        "| model | K × N | k | M | " + " | ".join(PATHS) + " | fastest |",
        "|---|---|---:|---:|" + "---:|" * len(PATHS) + "---|",
    ]
    for model, K, N in SHAPES:
        for k in (2, 3):
            for M in (1, 16):
                t = bench(K, N, k, M, args.reps)
                best = min(t, key=lambda p: t[p])
                cells = " | ".join(f"{t[p]:.3f}" for p in PATHS)
                rows.append(f"| {model} | {K} × {N} | {k} | {M} | {cells} | {best} |")
                print(rows[-1], flush=True)
    after = os.getloadavg()
    text = "\n".join(
        [
            "# CPU paths for BCQ (GPTQT) linears, group size 64",
            "",
            "Command: `.venv/bin/python benchmarks/bench_cpu_bcq.py "
            f"--reps {args.reps} --output benchmarks/results/cpu_bcq.md`, run pinned to one core "
            "(lane A: taskset -c 0, OMP_NUM_THREADS=1) with one torch thread on a shared 2-core "
            "machine; median ms per call, bf16 activations except dense fp32.",
            "",
            f"- CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"avx512_bf16: {torch.cpu._is_avx512_bf16_supported()}",
            f"- load average (1/5/15 min) before: {' / '.join(f'{v:.2f}' for v in before)}, "
            f"after: {' / '.join(f'{v:.2f}' for v in after)}",
            "",
            *rows,
            "",
        ]
    )
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
