"""Benchmark the Triton dequant-matmul against a dense fp16 torch.matmul on Llama-3-8B shapes.

    python benchmarks/bench_kernels.py [--bits 3 4] [--group 64] \\
        [--out benchmarks/results/bench_kernels.md]
    python benchmarks/bench_kernels.py --expected [--out ...]   # byte-count model only, no GPU

Shapes (K, N) are the decoder linears of Llama-3-8B: q/o (4096, 4096), gate/up (4096, 14336),
down (14336, 4096), fused qkv (4096, 6144); M (tokens) in {1, 4, 16, 64, 256}.

Bytes moved per call, the minimum any kernel must read and write:
  fp16 dense : 2·K·N + 2·M·K + 2·M·N
  b-bit GPTQ : K·N·b/8 (codes) + 2·(K/G)·N (fp16 scales) + (K/G)·N·b/8 (zeros) + 2·M·K + 2·M·N
Achieved bandwidth = bytes / time. At small M both are memory-bound, so the expected speedup is
the byte ratio; INT3 at G = 64 moves (3 + 19/64) bits per weight = 1/4.853 of fp16's 16.
The measured mode needs CUDA and refuses to run without it; `--expected` writes the model's
numbers (roofline lower bounds for an H100 SXM) for the first GPU run to replace.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 6144)]
BATCH = [1, 4, 16, 64, 256]
# H100 SXM5 datasheet: HBM3 3.35 TB/s, dense fp16 tensor core 989 TFLOP/s.
PEAK_BW = 3.35e12
PEAK_FLOPS = 989e12
HEADER_EXPECTED = (
    "# Dequant-matmul kernel benchmark: EXPECTED figures\n\n"
    "**Not yet measured: no GPU on the development machines.** Every number below comes from the\n"
    "byte count and an H100 SXM roofline (3.35 TB/s, 989 TFLOP/s dense fp16), not from a run.\n"
    "The first GPU run replaces this file: `python benchmarks/bench_kernels.py --out "
    "benchmarks/results/bench_kernels.md`.\n\n"
    "Bytes are the minimum any kernel must move. The GEMV's fp32 split-K workspace (written and "
    "read once: 8·splits·M·N B, capped by `pick_config` at 1/8 of the weight bytes and small "
    "enough to stay in L2) is left out.\n\n"
)


def weight_bytes(K: int, N: int, bits: int | None, group: int) -> int:
    """Bytes of the weight operand: fp16 when bits is None, else codes + fp16 scales + zeros."""
    if bits is None:
        return 2 * K * N
    n_g = K // group
    return K * N * bits // 8 + 2 * n_g * N + n_g * N * bits // 8


def bytes_moved(M: int, K: int, N: int, bits: int | None, group: int) -> int:
    return weight_bytes(K, N, bits, group) + 2 * M * K + 2 * M * N


def roofline_us(M: int, K: int, N: int, bits: int | None, group: int) -> float:
    return max(bytes_moved(M, K, N, bits, group) / PEAK_BW, 2 * M * K * N / PEAK_FLOPS) * 1e6


def expected_markdown(bits_list: list[int], group: int) -> str:
    lines = [
        HEADER_EXPECTED,
        "## Weight bytes per layer\n",
        "| K | N | fp16 (B) | "
        + " | ".join(f"INT{b} g{group} (B) | ratio" for b in bits_list)
        + " |",
        "|---|---|---|" + "---|---|" * len(bits_list),
    ]
    for K, N in SHAPES:
        fp = weight_bytes(K, N, None, group)
        cells = [
            f"{weight_bytes(K, N, b, group):,} | 1/{fp / weight_bytes(K, N, b, group):.3f}"
            for b in bits_list
        ]
        lines.append(f"| {K} | {N} | {fp:,} | " + " | ".join(cells) + " |")
    for b in bits_list:
        per_weight = b + (16 + b) / group
        lines.append(
            f"\nINT{b} g{group}: {b} + (16 + {b})/{group} = {per_weight:.6g} bits per weight "
            f"= 1/{16 / per_weight:.4f} of fp16."
        )
    lines += [
        "\n## Expected time (roofline lower bound) and speedup\n",
        "Time = max(bytes / 3.35 TB/s, 2·M·K·N / 989 TFLOP/s); the speedup column is the ratio of "
        "the two bounds, a ceiling. At M <= 64 both bounds are memory bounds and the ceiling is "
        "the byte ratio; at M = 256 the quantized kernel's bound turns into compute while fp16's "
        "is still memory, so the ceiling shrinks to about 1.3×. Beyond bytes, the dequant costs "
        "ALU work (shift, mask, subtract, convert, scale) per weight per BLOCK_M rows; from M of "
        "about 64 up that, not bandwidth, is likely to decide, so expect about 1× or below there. "
        "The 'measured' columns are empty until a GPU run.\n",
        "| K | N | M | bits | fp16 bytes | quant bytes | fp16 µs (bound) | quant µs (bound) "
        "| speedup bound | measured fp16 µs | measured quant µs | measured GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for K, N in SHAPES:
        for M in BATCH:
            for b in bits_list:
                f, q = roofline_us(M, K, N, None, group), roofline_us(M, K, N, b, group)
                lines.append(
                    f"| {K} | {N} | {M} | {b} | {bytes_moved(M, K, N, None, group):,} | "
                    f"{bytes_moved(M, K, N, b, group):,} | {f:.1f} | {q:.1f} | {f / q:.2f}× "
                    "| – | – | – |"
                )
    return "\n".join(lines) + "\n"


def measure(bits_list: list[int], group: int, act_order: bool, graphs: bool = True) -> str:
    from dataclasses import replace

    import torch
    import triton

    from tsq_vllm.format import pack_linear
    from tsq_vllm.kernels import dequant_matmul, dequant_matmul_reference

    # CUDA graphs hide the Python launch overhead, as in vLLM's decode; --no-graphs shows eager.
    bench = triton.testing.do_bench_cudagraph if graphs else triton.testing.do_bench
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    lines = [
        f"# Dequant-matmul kernel benchmark: measured on {name}\n",
        f"Command: `python benchmarks/bench_kernels.py --bits {' '.join(map(str, bits_list))} "
        f"--group {group}{' --act-order' if act_order else ''}"
        f"{'' if graphs else ' --no-graphs'}`; times are medians of "
        f"triton.testing.{bench.__name__}; bandwidth = minimum bytes moved / time.\n",
        "| K | N | M | bits | fp16 µs | quant µs | speedup | fp16 GB/s | quant GB/s "
        "| max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    gen = torch.Generator(device="cpu").manual_seed(0)
    for K, N in SHAPES:
        w16 = (torch.randn(K, N, generator=gen) * 0.02).to(torch.float16).to(dev)
        for b in bits_list:
            n_g = K // group
            codes = torch.randint(0, 2**b, (N, K), generator=gen)
            zeros = torch.randint(1, 2**b, (N, n_g), generator=gen)
            scales = (0.5 + torch.rand(N, n_g, generator=gen)) / 2**b * 0.05
            if act_order:
                perm = torch.randperm(K, generator=gen)
                g_idx = torch.empty(K, dtype=torch.int32)
                g_idx[perm] = (torch.arange(K) // group).to(torch.int32)
            else:
                g_idx = (torch.arange(K) // group).to(torch.int32)
            t = pack_linear(codes, scales, zeros, g_idx, b)
            layer = replace(
                t,
                qweight=t.qweight.to(dev),
                qzeros=t.qzeros.to(dev),
                scales=t.scales.to(dev),
                g_idx=t.g_idx.to(dev) if act_order else None,
            )
            for M in BATCH:
                x = torch.randn(M, K, device=dev, dtype=torch.float16)
                y = dequant_matmul(x, layer, backend="triton")
                ref = dequant_matmul_reference(x, layer)
                err = (
                    (y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)
                ).item()
                t16 = bench(lambda x=x, w16=w16: torch.matmul(x, w16))
                tq = bench(lambda x=x, layer=layer: dequant_matmul(x, layer, backend="triton"))
                b16, bq = bytes_moved(M, K, N, None, group), bytes_moved(M, K, N, b, group)
                lines.append(
                    f"| {K} | {N} | {M} | {b} | {t16 * 1e3:.1f} | {tq * 1e3:.1f} | {t16 / tq:.2f}× "
                    f"| {b16 / t16 / 1e6:.0f} | {bq / tq / 1e6:.0f} | {err:.1e} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--act-order", action="store_true", help="random act-order g_idx (gather path)")
    ap.add_argument("--no-graphs", action="store_true", help="time eager launches, not CUDA graphs")
    ap.add_argument(
        "--expected", action="store_true", help="write the byte-count model only (no GPU)"
    )
    ap.add_argument("--out", type=Path, help="write the markdown here as well as to stdout")
    args = ap.parse_args(argv)
    if args.expected:
        text = expected_markdown(args.bits, args.group)
    else:
        import torch

        if not torch.cuda.is_available():
            print(
                "bench_kernels: CUDA is not available; this benchmark times the Triton kernels on "
                "a GPU and cannot run here. Use --expected for the byte-count model.",
                file=sys.stderr,
            )
            return 2
        text = measure(args.bits, args.group, args.act_order, graphs=not args.no_graphs)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
