"""Cost and quality of the two stages on one LLaMA-sized linear layer (CPU).

    .venv/bin/python benchmarks/bench_layer.py --size 4096 --reps 3 \\
        --output benchmarks/results/bench_layer.md

H and R are the exact second moments of a synthetic input distribution with strong feature
correlation and uneven feature scales (what 128 × 2048 calibration tokens estimate), so the layer
costs what a real 4096 × 4096 layer costs without generating 262k activation rows. Variants are
timed round-robin in one process and the median of `--reps` runs is reported, so the ratios are
measured side by side on the same (noisy, shared) machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tsq_vllm.core import layer_objective
from tsq_vllm.quantize import LayerScheme, quantize_weight

VARIANTS = {
    "GPTQ (min-max scales)": dict(stage1=False, stage2=False),
    "GPTQ (MSE clip search)": dict(stage1=False, stage2=False, scale_search="mse"),
    "GPTQ + stage 1": dict(stage2=False),
    "GPTQ + stage 2 (with R)": dict(stage1=False),
    "GPTQ + stage 1 + stage 2 (with R)": dict(),
}


def synthetic_moments(K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """H = E[x xᵀ] and R = E[Δx xᵀ] for x̃ = z C (z white), x = x̃ (I + B), Δx = x − x̃ = x̃ B."""
    g = torch.Generator().manual_seed(seed)
    C = (torch.eye(K) + 2 * torch.randn(K, K, generator=g) / K**0.5) * (
        0.1 + 2 * torch.rand(K, generator=g)
    )
    B = 0.1 * torch.randn(K, K, generator=g) / K**0.5
    S = C.t() @ C  # E[x̃ᵀ x̃] for row vectors
    IB = torch.eye(K) + B
    H = IB.t() @ S @ IB
    R = B.t() @ S @ IB
    return 0.5 * (H + H.t()), R


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=4096, help="K = N of the layer")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="timed runs per variant (median reported)")
    p.add_argument("--output", type=Path, help="write the markdown table here")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    K = args.size
    H, R = synthetic_moments(K)
    W = 0.02 * torch.randn(K, K)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    loss: dict[str, float] = {}
    stats: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for _ in range(args.reps):
        for name, kw in VARIANTS.items():
            uses_r = "with R" in name
            t = time.perf_counter()
            scheme = LayerScheme(bits=args.bits, group_size=args.group_size, **kw)
            qw = quantize_weight(W, H, scheme, R=R if uses_r else None)
            times[name].append(time.perf_counter() - t)
            loss[name] = layer_objective(W, qw.dequantize(), H, R)
            stats[name].append(qw.stats)

    base = statistics.median(times["GPTQ (min-max scales)"])
    base_mse = statistics.median(times["GPTQ (MSE clip search)"])
    ref_loss = loss["GPTQ (min-max scales)"]
    lines = [
        f"# One layer: K = N = {K}, INT{args.bits}, group {args.group_size}",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_layer.py --size {K} --bits {args.bits} "
        f"--group-size {args.group_size} --reps {args.reps}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}; median of {args.reps} runs, variants interleaved.",
        "",
        "Loss is the paper's eq. (7), (q − w)ᵀH(q − w) + 2wᵀR(q − w) summed over rows, relative "
        "to GPTQ with min-max scales.",
        "",
        "| variant | time (s) | × GPTQ min-max | × GPTQ MSE | grid (s) | GPTQ loop (s) | stage 2 "
        "(s) | loss (rel.) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        t = statistics.median(times[name])
        s = {
            k: statistics.median(run.get(k, 0.0) for run in stats[name])
            for k in ("time_grid", "time_gptq", "time_stage2")
        }
        lines.append(
            f"| {name} | {t:.2f} | {t / base:.2f} | {t / base_mse:.2f} | {s['time_grid']:.2f} | "
            f"{s['time_gptq']:.2f} | {s['time_stage2']:.2f} | {loss[name] / ref_loss:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
