"""Time of one calibration batch's second-moment accumulation: K×K R and D, or per linear.

    python benchmarks/bench_accumulate.py                     # the default shapes, 5 repetitions
    python benchmarks/bench_accumulate.py --reps 3 --output /tmp/acc.md

For down_proj-shaped inputs (K = intermediate, one reading linear with N = hidden) it times
`HessianAccumulator.add` on one batch of T tokens in the two ways the pipeline can run it:

  K×K      H, R = E[ΔX Xᵀ] (float64) and D = E[ΔX ΔXᵀ] (float32): what q/k/v, o and gate/up use
  per-linear  H, and W R and wᵀDw through the linear's weight (`weights=`): what down_proj uses

and, as the floor both share, H alone (plain GPTQ). Repetitions alternate between the modes, so
they share the machine's load; the table gives medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsq_vllm.core.hessian import HessianAccumulator  # noqa: E402

# (model, K = intermediate, N = hidden)
SHAPES = [("SmolLM2-135M", 1536, 576), ("Qwen2.5-1.5B", 8960, 1536)]


def _time_add(acc: HessianAccumulator, x: torch.Tensor, x_fp: torch.Tensor | None) -> float:
    t = time.perf_counter()
    acc.add(x, x_fp)
    return time.perf_counter() - t


def measure(K: int, N: int, tokens: int, reps: int) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, K, generator=g)
    x_fp = x + 0.1 * torch.randn(tokens, K, generator=g)
    W = torch.randn(N, K, generator=g) / K**0.5
    times: dict[str, list[float]] = {"H only": [], "K×K": [], "per-linear": []}
    for _ in range(reps):
        times["H only"].append(_time_add(HessianAccumulator(K), x, None))
        times["K×K"].append(_time_add(HessianAccumulator(K, with_r=True), x, x_fp))
        acc = HessianAccumulator(K, with_r=True, weights=[W])
        times["per-linear"].append(_time_add(acc, x, x_fp))
    return times


def _isa() -> str:
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return ", ".join(
        f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per batch (8 x 256)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/accumulate.md"))
    args = p.parse_args()
    rows = []
    for model, K, N in SHAPES:
        t = measure(K, N, args.tokens, args.reps)
        med = {k: statistics.median(v) for k, v in t.items()}
        rows.append((model, K, N, med, t))
        print(model, {k: round(v, 3) for k, v in med.items()}, flush=True)
    env = " ".join(
        f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
    )
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# One batch's second-moment accumulation for a down_proj-shaped input",
        "",
        f"Command: `{env + ' ' if env else ''}python {shlex.join(sys.argv)}` ({now}). "
        f"{platform.processor() or platform.machine()}, ISA: {_isa()}; torch {torch.__version__} "
        f"with {torch.get_num_threads()} thread(s); {args.tokens} tokens per batch, medians of "
        f"{args.reps} alternating repetitions (seconds per batch).",
        "",
        "| model | K (intermediate) | N (hidden) | H only | K×K (H, R, D) "
        "| per-linear (H, W R, wᵀDw) | FP-stream part, K×K → per-linear |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for model, K, N, med, _ in rows:
        fp_kk, fp_pl = med["K×K"] - med["H only"], med["per-linear"] - med["H only"]
        lines.append(
            f"| {model} | {K} | {N} | {med['H only']:.3f} | {med['K×K']:.3f} | "
            f"{med['per-linear']:.3f} | {fp_kk:.3f} → {fp_pl:.3f} s "
            f"({fp_kk / max(fp_pl, 1e-9):.1f}× less) |"
        )
    lines += ["", "Each repetition, in order (s):", ""]
    for model, _, _, _, t in rows:
        lines.append(
            f"- {model}: "
            + "; ".join(f"{k}: " + ", ".join(f"{v:.3f}" for v in vs) for k, vs in t.items())
        )
    Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
