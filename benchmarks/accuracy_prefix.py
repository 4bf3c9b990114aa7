"""accuracy.py's rows on a prefix of the decoder stack: the first N layers quantized, the rest FP.

    python benchmarks/accuracy_prefix.py --model M.gguf --tag NAME --layers 8 --row gptq
    python benchmarks/accuracy_prefix.py --model M.gguf --tag NAME --report-only

accuracy.py quantizes every layer and evaluates the checkpoint it wrote; for a 1.5B model on one
CPU thread that is hours per row. This script runs one row of the same grid (accuracy.py's
TSQ_ROWS flags, parsed by the quantize CLI's parser; the same calibration windows; the same wiki
test windows and `tsq_vllm.eval.perplexity`) in memory: `quantize_model` on the first --layers
decoder layers (true-sequential, as in a full run, which only stops earlier), then perplexity of
the whole model, whose quantized linears hold exactly the dequantized weights a checkpoint load
computes with. It also counts negative scales per projection kind in the packed tensors a
checkpoint would store. Row "fp" evaluates the unquantized model. One JSON line per row in
benchmarks/results/accuracy_TAG_prefix.jsonl; the .md beside it is rewritten after each row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from accuracy import LABELS, TSQ_ROWS, _machine  # benchmarks/ is on sys.path

RESULTS = Path(__file__).resolve().parent / "results"


def _negative_scales(packed: dict) -> dict[str, list[int]]:
    """{projection kind: [negative, total]} over the packed fp16 scales."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, layer in packed.items():
        c = out[name.rsplit(".", 1)[-1]]
        c[0] += int((layer.scales < 0).sum())
        c[1] += layer.scales.numel()
    return dict(out)


def run_row(args: argparse.Namespace) -> dict:
    from torch import nn

    from tsq_vllm.data import contiguous_windows, load_documents, sample_windows, tokenize_documents
    from tsq_vllm.eval import perplexity
    from tsq_vllm.models import find_decoder_layers, load_model, load_tokenizer, resolve_source
    from tsq_vllm.quantize.__main__ import build_parser
    from tsq_vllm.quantize.options import QuantizeOptions
    from tsq_vllm.quantize.pipeline import quantize_model

    src = resolve_source(args.model)
    tok = load_tokenizer(src)
    test = contiguous_windows(
        tokenize_documents(tok, load_documents("wiki", split="test")), 512, args.eval_tokens
    )
    t = time.perf_counter()
    model = load_model(src)
    entry: dict = {"row": args.row, "load_seconds": time.perf_counter() - t}
    if args.row != "fp":
        flags = dict((k, f) for k, _, f in TSQ_ROWS)[args.row]
        qargs = ["--model", args.model, "--bits", str(args.bits), "--group-size",
                 str(args.group_size), "--calib", "wiki", "--nsamples", str(args.nsamples),
                 "--seqlen", str(args.seqlen), "--seed", str(args.seed), *flags,
                 "--output", "/nonexistent-in-memory-only"]  # fmt: skip
        opts = vars(build_parser().parse_args(qargs))
        opts.pop("debug")
        opts = QuantizeOptions(**opts)
        calib = sample_windows(
            tokenize_documents(tok, load_documents("wiki", split="calib")),
            args.nsamples,
            args.seqlen,
            args.seed,
        )
        parent_name, full = find_decoder_layers(model)
        parent = model.get_submodule(parent_name.rsplit(".", 1)[0])
        leaf = parent_name.rsplit(".", 1)[-1]
        setattr(parent, leaf, nn.ModuleList(full[: args.layers]))  # the pipeline sees N layers
        try:
            res = quantize_model(model, calib, opts)
        finally:
            setattr(parent, leaf, full)
        stats = res.stats.values()
        entry.update(
            bits=args.bits,
            group_size=args.group_size,
            layers=args.layers,
            of_layers=len(full),
            quantize_seconds=res.seconds,
            **{k: sum(s[k] for s in stats) for k in ("time_grid", "time_gptq", "time_stage2")},
            negative_scales=_negative_scales(res.packed),
            command="python benchmarks/accuracy_prefix.py " + " ".join(sys.argv[1:]),
            quantize_flags=flags,
        )
        # Per-linear quality (true eq. (7) relative to the FP output energy), where logged.
        entry["linear_stats"] = {
            n: {k: s[k] for k in ("rel_error", "energy_ratio") if k in s}
            for n, s in res.stats.items()
        }
    t = time.perf_counter()
    ppl = perplexity(model, test, batch_size=1)
    entry["eval"] = {**ppl, "eval_seconds": time.perf_counter() - t, "windows": len(test)}
    return entry


def _quality_table(rows: dict) -> list[str]:
    """Median over layers, per projection kind, of rel error (true eq. (7) / FP output energy)
    and of the output-energy ratio E‖QX‖² / E‖WX̃‖²."""
    kinds: list[str] = []
    per_row = {}
    for key, r in rows.items():
        by_kind: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for name, st in r.get("linear_stats", {}).items():
            if "rel_error" in st:
                kind = name.rsplit(".", 1)[-1]
                by_kind[kind].append((st["rel_error"], st["energy_ratio"]))
                kinds += [kind] if kind not in kinds else []
        if by_kind:
            per_row[key] = by_kind
    if not per_row:
        return []
    out = [
        "",
        "Per linear, median over the quantized layers: rel error E‖QX − WX̃‖² / E‖WX̃‖² "
        "(QX on the quantized stream, WX̃ the FP layer on the FP stream; rows without error "
        "feedback measure it on one stream) / output energy E‖QX‖² / E‖WX̃‖².",
        "",
        "| row | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for (row, bits, gs, _), by_kind in per_row.items():
        cells = [
            f"{statistics.median(e for e, _ in by_kind[k]):.4f} / "
            f"{statistics.median(x for _, x in by_kind[k]):.3f}"
            if k in by_kind
            else ""
            for k in kinds
        ]
        out.append(f"| {LABELS[row]} INT{bits} g{gs} | " + " | ".join(cells) + " |")
    return out


def write_report(done: list[dict], md: Path, tag: str) -> None:
    fp = next((r for r in reversed(done) if r["row"] == "fp"), None)
    rows = {(r["row"], r.get("bits"), r.get("group_size"), r.get("layers")): r for r in done}
    lines = [
        f"# {tag}: rows with the first N decoder layers quantized (the rest full precision)",
        "",
        "Generated by `benchmarks/accuracy_prefix.py` (commands below); see the notes above "
        "the table for why the prefix and what the numbers mean.",
        "",
        "| row | bits | group | layers quantized | wiki ppl | vs FP | negative scales (by kind) "
        "| quantize (s) | eval (s) | finished |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (row, bits, gs, layers), r in rows.items():
        ppl = r["eval"]["ppl"]
        vs = f"{ppl - fp['eval']['ppl']:+.2f}" if fp else ""
        neg = r.get("negative_scales", {})
        negs = (
            f"{sum(c[0] for c in neg.values())} ("
            + ", ".join(f"{k} {c[0]}" for k, c in neg.items() if c[0])
            + ")"
            if neg
            else ""
        )
        quantized = f"{layers} of {r['of_layers']}" if layers else "0"
        lines.append(
            f"| {LABELS.get(row, 'FP (dequantized GGUF, fp32)')} | {bits or ''} | {gs or ''} | "
            f"{quantized} | {ppl:.3f} | {vs} | "
            f"{negs.replace(' ()', '')} | {r.get('quantize_seconds', 0):.0f} | "
            f"{r['eval']['eval_seconds']:.0f} | {r['when']} |"
        )
    lines += _quality_table(rows)
    lines += ["", f"Machine: {done[-1]['machine']}; one torch thread per row "
              f"(OMP_NUM_THREADS={done[-1].get('omp_threads', '')}), pinned to one core of a "
              "machine shared with other jobs.", "", "```"]  # fmt: skip
    lines += [r["command"] for r in rows.values() if "command" in r] + ["```", ""]
    notes = md.with_suffix(".notes.md")
    if notes.exists():
        lines[1:1] = ["", notes.read_text().rstrip()]
    md.write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="'smollm2', a .gguf file or an HF directory")
    p.add_argument("--tag", required=True, help="the model's name in the result file names")
    p.add_argument("--row", default="fp", choices=["fp", *(k for k, _, _ in TSQ_ROWS)])
    p.add_argument("--layers", type=int, default=4, help="decoder layers to quantize, from 0")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    results = RESULTS / f"accuracy_{args.tag}_prefix.jsonl"
    done = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    if not args.report_only:
        entry = run_row(args)
        entry.update(
            setup={k: getattr(args, k) for k in ("nsamples", "seqlen", "seed", "eval_tokens")},
            omp_threads=os.environ.get("OMP_NUM_THREADS", ""),
            load=os.getloadavg()[0],
            when=f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            machine=_machine(),
        )
        done.append(entry)
        with results.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        print(f"{args.row}: ppl {entry['eval']['ppl']:.3f}", flush=True)
    if done:
        write_report(done, results.with_suffix(".md"), args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
