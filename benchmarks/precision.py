"""float32 against float64 for the Hessian accumulation and GPTQ's factorizations, on real layers.

    python benchmarks/precision.py --layers 0 15 29 --nsamples 16 --seqlen 256

For some decoder layers of SmolLM2-135M (the embedded GGUF, dequantized to float32) it captures
the inputs of q_proj, o_proj, up_proj and down_proj on wiki calibration windows (one forward pass
of the full-precision model), accumulates H = E[X Xᵀ] once in float64 and once in float32 (same
batches), and quantizes each weight with the default scheme (both stages; no error-feedback term,
since only one stream is captured) at `--precision float64` with the float64 H and at
`--precision float32` with the float32 H. It reports, per linear, the relative difference of the
two H, the fraction of identical integer codes, eq. (7)'s loss (q − w)ᵀH(q − w) of each result
under the float64 H, and the time of each `quantize_weight` call (CPU, torch threads as set by
OMP_NUM_THREADS). Writes benchmarks/results/precision.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tsq_vllm, not an installed one

from tsq_vllm.core import HessianAccumulator, layer_objective  # noqa: E402
from tsq_vllm.data import load_documents, sample_windows, tokenize_documents  # noqa: E402
from tsq_vllm.models import load_model, load_tokenizer, resolve_source  # noqa: E402
from tsq_vllm.quantize import LayerScheme, quantize_weight  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def _isa() -> str:
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return "?"
    return ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags) or "-"


def _cpu() -> str:
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@torch.no_grad()
def capture(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
    src = resolve_source("smollm2")
    model = load_model(src)
    tok = load_tokenizer(src)
    windows = sample_windows(
        tokenize_documents(tok, load_documents("wiki", split="calib")),
        args.nsamples,
        args.seqlen,
        0,
    )
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i in args.layers:
        for name in LINEARS:
            full = f"model.layers.{i}.{name}"
            lin = model.get_submodule(full)
            seen[full] = []
            hooks.append(
                lin.register_forward_pre_hook(lambda _m, a, f=full: seen[f].append(a[0].detach()))
            )
    for b in range(0, windows.shape[0], 8):
        model(input_ids=windows[b : b + 8], use_cache=False)
    for h in hooks:
        h.remove()
    return {
        f: (model.get_submodule(f).weight.detach().float().clone(), xs) for f, xs in seen.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/precision.md"))
    args = p.parse_args()

    rows = []
    for full, (W, xs) in capture(args).items():
        K = W.shape[1]
        H = {}
        for dtype in (torch.float64, torch.float32):
            acc = HessianAccumulator(K, dtype=dtype)
            for x in xs:
                acc.add(x)
            H[dtype] = acc.finalize()[0]
        h_diff = float((H[torch.float32] - H[torch.float64]).norm() / H[torch.float64].norm())
        out = {}
        for precision, dtype in (("float64", torch.float64), ("float32", torch.float32)):
            scheme = LayerScheme(bits=args.bits, group_size=args.group_size, precision=precision)
            t = time.perf_counter()
            qw = quantize_weight(W, H[dtype], scheme)
            seconds = time.perf_counter() - t
            loss = layer_objective(W, qw.dequantize(), H[torch.float64], None)
            out[precision] = (qw.codes, loss, seconds)
        agree = float((out["float32"][0] == out["float64"][0]).float().mean())
        rel = out["float32"][1] / out["float64"][1] - 1
        rows.append((full, tuple(W.shape), h_diff, agree, out["float64"][1], rel, out))
        print(f"{full}: H rel diff {h_diff:.2e}, codes equal {agree:.4%}, loss rel {rel:+.2e}")

    lines = [
        "# float32 vs float64: Hessian accumulation and GPTQ factorizations (SmolLM2-135M)",
        "",
        f"Command: `python benchmarks/precision.py --layers {' '.join(map(str, args.layers))} "
        f"--nsamples {args.nsamples} --seqlen {args.seqlen} --bits {args.bits} --group-size "
        f"{args.group_size}`",
        "",
        f"Machine: {_cpu()} (ISA: {_isa()}), {torch.get_num_threads()} torch thread(s), torch "
        f"{torch.__version__}; a shared machine (lane A: one core, one thread).",
        "",
        f"INT{args.bits} g{args.group_size}, both stages, {args.nsamples} x {args.seqlen} wiki "
        "calibration tokens through the full-precision model. Loss: (q − w)ᵀH(q − w) summed over "
        "rows under the float64 H; 'loss f32/f64 − 1' > 0 means float32 is worse.",
        "",
        "| linear | [N, K] | ‖H32 − H64‖/‖H64‖ | codes equal | loss (f64) | loss f32/f64 − 1 "
        "| time f64 (s) | time f32 (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for full, shape, h_diff, agree, loss, rel, out in rows:
        lines.append(
            f"| {full} | {list(shape)} | {h_diff:.1e} | {agree:.3%} | {loss:.4g} | {rel:+.1e} | "
            f"{out['float64'][2]:.2f} | {out['float32'][2]:.2f} |"
        )
    rels = [r[5] for r in rows]
    agrees = [r[3] for r in rows]
    t64 = sum(r[6]["float64"][2] for r in rows)
    t32 = sum(r[6]["float32"][2] for r in rows)
    lines += [
        "",
        f"Over {len(rows)} linears: codes equal {min(agrees):.3%} (min) / "
        f"{sum(agrees) / len(agrees):.3%} (mean); loss change {min(rels):+.1e} .. "
        f"{max(rels):+.1e} (mean {sum(rels) / len(rels):+.1e}); quantize_weight time "
        f"{t64:.1f} s float64, {t32:.1f} s float32 ({t64 / t32:.2f}x).",
        "",
    ]
    Path(args.output).write_text("\n".join(lines))
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
