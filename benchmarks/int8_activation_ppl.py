"""What the opt-in int8-activation CPU path (`TSQ_CPU_INT8=1`) costs in perplexity.

    .venv/bin/python benchmarks/int8_activation_ppl.py CKPT [CKPT ...] --max-tokens 8192 \\
        --output benchmarks/results/int8_activation_ppl.md

Each tsq checkpoint (4-bit lanes: INT2/3/4, groups of a multiple of 64, no act-order g_idx) is
loaded as `tsq_vllm.eval` loads it, in bf16, and its quantized linears are served by the native
CPU kernel exactly as vLLM's decode steps call it: rows in batches of at most 16, bf16
activations, once on the default bf16 path (`int8=False`) and once with x quantized to int8 per
row and group (`int8=True`: AMX-INT8 tiles where they run, else AVX512-VNNI). The same windows of
the held-out wiki split go through both; the table has both perplexities and their ratio, with
the CPU's ISA and which int8 variant ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tsq_vllm.checkpoint.modules import QuantLinear
from tsq_vllm.data import contiguous_windows, load_documents, tokenize_documents
from tsq_vllm.eval import load_for_eval, perplexity
from tsq_vllm.kernels.cpu import prepare_cpu_linear
from tsq_vllm.kernels.cpu_native import (
    amx_int8_unavailable_reason,
    int8_unavailable_reason,
    native_mm,
    native_unavailable_reason,
)

ROWS = 16  # the int8 path's batch: decode steps of up to 16 streams


def _serve_with_native(model: torch.nn.Module) -> Callable[[bool], None]:
    """Replace every QuantLinear's forward by the native kernel; returns a switch that picks
    the int8 (True) or the bf16 path (False) for all of them."""
    mode = {"int8": False}
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        prep = prepare_cpu_linear(mod.layer, act_dtype=torch.bfloat16, path="native")
        if prep.native is None or prep.perm is not None:
            raise SystemExit(f"{name}: the int8 path needs 4-bit codes without act-order g_idx")
        bias = mod.bias

        def forward(x: torch.Tensor, w=prep.native, bias=bias, n=mod.out_features) -> torch.Tensor:
            x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
            y = torch.cat(
                [native_mm(x2[i : i + ROWS], w, int8=mode["int8"]) for i in range(0, len(x2), ROWS)]
            )
            if bias is not None:
                y = y + bias.to(y.dtype)
            return y.to(x.dtype).reshape(*x.shape[:-1], n)

        mod.forward = forward  # type: ignore[method-assign]
        # The packed buffers stay (the module keeps them); the decoded reference is never built.

    def use_int8(on: bool) -> None:
        mode["int8"] = on

    return use_int8


def _cpu() -> str:
    """The CPU's model name and the ISA flags that decide the kernel paths (/proc/cpuinfo)."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    flags = next(
        (set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set()
    )
    want = ("avx512f", "avx512_bf16", "avx512_vnni", "avx512vbmi", "amx_tile", "amx_int8")
    isa = ", ".join(f for f in want if f in flags) or "none of " + ", ".join(want)
    return f"{model}, {os.cpu_count()} logical cores; /proc/cpuinfo lists {isa}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--output", type=Path)
    args = p.parse_args(argv)
    for why in (native_unavailable_reason(), int8_unavailable_reason()):
        if why is not None:
            raise SystemExit(f"the int8 path cannot run here: {why}")
    variant = "AMX-INT8 tiles" if amx_int8_unavailable_reason() is None else "AVX512-VNNI"
    docs = load_documents("wiki", split="test")
    rows, results = [], []
    for ckpt in args.checkpoints:
        model, tok, info = load_for_eval(str(ckpt), dtype="bfloat16")
        windows = contiguous_windows(tokenize_documents(tok, docs), args.seqlen, args.max_tokens)
        use_int8 = _serve_with_native(model)
        res = {"checkpoint": str(ckpt), "bits": info["quantization_config"].get("bits")}
        for on in (False, True):
            use_int8(on)
            t = time.perf_counter()
            r = perplexity(model, windows, batch_size=args.batch_size)
            res["int8" if on else "bf16"] = {**r, "seconds": time.perf_counter() - t}
        results.append(res)
        b, q = res["bf16"]["ppl"], res["int8"]["ppl"]
        rows.append(
            f"| {ckpt.name} | {res['bits']} | {res['bf16']['tokens']} | {b:.4f} | {q:.4f} | "
            f"{q / b:.4f} ({100 * (q / b - 1):+.2f} %) | "
            f"{res['bf16']['seconds']:.0f} / {res['int8']['seconds']:.0f} |"
        )
        del model
    cmd = " ".join(
        [".venv/bin/python benchmarks/int8_activation_ppl.py", *map(str, args.checkpoints)]
        + [f"--max-tokens {args.max_tokens} --seqlen {args.seqlen}"]
    )
    text = "\n".join(
        [
            "# Perplexity cost of int8 activations (native CPU kernel)",
            "",
            f"Command: `{cmd}`; wiki test split, windows of {args.seqlen} tokens, bf16 model, "
            f"quantized linears on the native kernel in batches of {ROWS} rows.",
            "",
            f"- CPU: {_cpu()}; torch {torch.__version__}; int8 variant that ran: {variant}",
            "",
            "| checkpoint | bits | tokens | ppl, bf16 path | ppl, int8 activations | ratio | "
            "seconds (bf16 / int8) |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    sys.stdout.write(text)
    if args.output:
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.output)
        json_out = args.output.with_suffix(".json")
        tmp = json_out.with_name(json_out.name + ".tmp")
        tmp.write_text(json.dumps({"variant": variant, "results": results}, indent=1) + "\n")
        tmp.replace(json_out)
    return 0 if all(math.isfinite(r["int8"]["ppl"]) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
