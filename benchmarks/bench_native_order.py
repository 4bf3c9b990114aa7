"""The native CPU kernel at this commit against its source at another revision, side by side.

    .venv/bin/python benchmarks/bench_native_order.py --baseline-rev 6c3539d --threads 1

Builds the baseline's `kernels/csrc/cpu_int4_gemm.cpp` (read with `git show REV:PATH`) as a
second extension, checks both give the same bits on random INT4 g64 weights, and times both and a
dense bf16 F.linear, interleaved, median of --reps calls, for Qwen2.5-1.5B and Llama-3-8B MLP
shapes at M = 1 … 128. Prints a markdown table with the CPU and its ISA flags.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

from tsq_vllm.kernels import cpu_native as cn

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1536, 1536), (1536, 8960), (8960, 1536), (4096, 14336), (14336, 4096)]


def isa() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    keep = [f for f in flags if f.startswith(("avx512", "amx")) or f == "avx2"]
    return f"{platform.processor() or platform.machine()}; flags: {' '.join(sorted(keep))}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-rev", required=True)
    p.add_argument("--baseline-path", default="tsq_vllm/kernels/csrc/cpu_int4_gemm.cpp")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    src = subprocess.run(
        ["git", "show", f"{args.baseline_rev}:{args.baseline_path}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "baseline_gemm.cpp"
        path.write_text(src)
        old = load(name="tsq_baseline_gemm", sources=[str(path)], extra_cflags=cn._FLAGS)
    if (reason := cn.native_unavailable_reason()) is not None:
        raise SystemExit(f"the native kernel cannot run here: {reason}")
    new = cn._built[0]
    print(f"CPU: {isa()}; torch {torch.__version__}, {args.threads} thread(s)\n")
    print(
        f"| K × N | M | {args.baseline_rev} (ms) | this commit (ms) | dense bf16 (ms) | "
        "speedup | this commit vs bf16 |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    g = torch.Generator().manual_seed(0)
    for K, N in SHAPES:
        codes = torch.randint(0, 16, (K, N), generator=g)
        s = torch.rand(K // 64, N, generator=g) * 0.01
        w = cn.pack_native(codes, s, -8 * s, 64)
        dense = (w.scale[:, :N].repeat_interleave(64, 0) * (codes.float() - 8)).bfloat16()
        dense = dense.t().contiguous()
        for M in (1, 4, 16, 32, 128):
            x = torch.randn(M, K, generator=g).bfloat16()
            paths = {
                "old": lambda x=x, w=w: old.int4_gemm(x, w.packed, w.scale, w.offset, 64),
                "new": lambda x=x, w=w: new.int4_gemm(x, w.packed, w.scale, w.offset, 64),
                "bf16": lambda x=x, d=dense: F.linear(x, d),
            }
            assert torch.equal(paths["old"](), paths["new"]())
            times: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(args.reps):
                for k, f in paths.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(
                f"| {K} × {N} | {M} | {ms['old']:.3f} | {ms['new']:.3f} | {ms['bf16']:.3f} | "
                f"{ms['old'] / ms['new']:.2f}× | {ms['bf16'] / ms['new']:.2f}× |",
                flush=True,
            )


if __name__ == "__main__":
    main()
