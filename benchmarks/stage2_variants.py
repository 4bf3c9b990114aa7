"""Stage-2 variants on SmolLM2-135M: scale box, damped error feedback, energy matching.

    python benchmarks/stage2_variants.py                  # every row, skipping those already done
    python benchmarks/stage2_variants.py --report-only    # rewrite the report from the results file

Each row quantizes SmolLM2-135M in its own process through the CLI's parser and `run_quantization`
(the same code path as `python -m tsq_vllm.quantize`), with the same calibration windows for every
row, then evaluates the checkpoint with `python -m tsq_vllm.eval` (the evaluator of
benchmarks/accuracy.py), counts the negative and zero scales in the checkpoint, and summarizes the
per-linear output-energy ratio E‖QX‖²/E‖WX̃‖² and relative error E‖QX − WX̃‖²/E‖WX̃‖² of the run.
Rows run one at a time; every finished row is appended to a JSON-lines file (so a rerun resumes),
and the checkpoint is deleted once measured (only the numbers are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

# This checkout's package, not whichever one the venv has installed; and benchmarks/ for
# accuracy.py.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from accuracy import (  # noqa: E402  (benchmarks/ is not a package)
    _machine,
    append_row,
    quantize_like_cli,
    quantize_row,
    read_rows,
    run_eval,
    smollm2_quantize_args,
    wiki_calib_args,
)
from stage2_report import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"

# (key, label, extra `python -m tsq_vllm.quantize` flags), in order of priority.
ROWS = [
    (
        "a1_box2",
        "both stages, alpha 1, box 2",
        ["--error-feedback-alpha", "1", "--scale-box", "2", "--gptaq-alpha", "0"],
    ),
    (
        "a0.5_box2",
        "both stages, alpha 0.5, box 2",
        ["--error-feedback-alpha", "0.5", "--scale-box", "2", "--gptaq-alpha", "0"],
    ),
    (
        "a0_box2",
        "both stages, alpha 0, box 2",
        ["--error-feedback-alpha", "0", "--scale-box", "2", "--gptaq-alpha", "0"],
    ),
    (
        "a0.25_box2",
        "both stages, alpha 0.25, box 2",
        ["--error-feedback-alpha", "0.25", "--scale-box", "2", "--gptaq-alpha", "0"],
    ),
    (
        "a1_box2_em",
        "both stages, alpha 1, box 2, energy-matched",
        ["--error-feedback-alpha", "1", "--scale-box", "2", "--energy-match", "--gptaq-alpha", "0"],
    ),
    (
        "a1_nobox",
        "both stages, alpha 1, no box (the old default)",
        ["--error-feedback-alpha", "1", "--scale-box", "0", "--gptaq-alpha", "0"],
    ),
    ("s1", "GPTQ + stage 1", ["--no-stage2", "--gptaq-alpha", "0"]),
    (
        "gptq_mse",
        "GPTQ, MSE p=2.4 scales",
        [
            "--no-stage1",
            "--no-stage2",
            "--scale-search",
            "mse",
            "--mse-norm",
            "2.4",
            "--gptaq-alpha",
            "0",
        ],
    ),
    ("gptq", "GPTQ (min-max scales)", ["--no-stage1", "--no-stage2", "--gptaq-alpha", "0"]),
    (
        "a1_box4",
        "both stages, alpha 1, box 4",
        ["--error-feedback-alpha", "1", "--scale-box", "4", "--gptaq-alpha", "0"],
    ),
    (
        "a1_box1.25",
        "both stages, alpha 1, box 1.25",
        ["--error-feedback-alpha", "1", "--scale-box", "1.25", "--gptaq-alpha", "0"],
    ),
    (
        "gq0.25_a1_box2",
        "both stages, alpha 1, box 2, GPTAQ target 0.25",
        ["--gptaq-alpha", "0.25", "--error-feedback-alpha", "1", "--scale-box", "2"],
    ),
    (
        "a0.5_box4",
        "both stages, alpha 0.5, box 4",
        ["--error-feedback-alpha", "0.5", "--scale-box", "4", "--gptaq-alpha", "0"],
    ),
    (
        "a0.5_box1.25",
        "both stages, alpha 0.5, box 1.25",
        ["--error-feedback-alpha", "0.5", "--scale-box", "1.25", "--gptaq-alpha", "0"],
    ),
    (
        "a0.5_box2_em",
        "both stages, alpha 0.5, box 2, energy-matched",
        [
            "--error-feedback-alpha",
            "0.5",
            "--scale-box",
            "2",
            "--energy-match",
            "--gptaq-alpha",
            "0",
        ],
    ),
    (
        "gq0.25_a0.5_box2",
        "both stages, alpha 0.5, box 2, GPTAQ target 0.25",
        ["--gptaq-alpha", "0.25", "--error-feedback-alpha", "0.5", "--scale-box", "2"],
    ),
    (
        "gq0.25_a0.25_box2",
        "both stages, alpha 0.25, box 2, GPTAQ target 0.25",
        ["--gptaq-alpha", "0.25", "--error-feedback-alpha", "0.25", "--scale-box", "2"],
    ),
    ("gq0.25_s1", "GPTQ + stage 1, GPTAQ target 0.25", ["--no-stage2", "--gptaq-alpha", "0.25"]),
    # The GPTAQ damping at the default's stage 2 (alpha 0.25, box 2): is 0.25 right per bit width?
    *[
        (
            f"gq{g}_a{a}_box2",
            f"both stages, alpha {a}, box 2, GPTAQ target {g}",
            ["--gptaq-alpha", g, "--error-feedback-alpha", a, "--scale-box", "2"],
        )
        for g, a in (("0.5", "0.25"), ("1", "0.25"), ("0.25", "0"))
    ],
    # Table 3 again with today's settings: GPTQ (GPTAQ target 0.25), + stage 1 (the row above),
    # + stage 2 (alpha 0.25, box 2), both (the default, gq0.25_a0.25_box2).
    (
        "gq0.25_gptq",
        "GPTQ, GPTAQ target 0.25",
        ["--no-stage1", "--no-stage2", "--gptaq-alpha", "0.25"],
    ),
    (
        "gq0.25_s2",
        "GPTQ + stage 2, alpha 0.25, box 2, GPTAQ target 0.25",
        [
            "--no-stage1",
            "--gptaq-alpha",
            "0.25",
            "--error-feedback-alpha",
            "0.25",
            "--scale-box",
            "2",
        ],
    ),
    # The default with the accumulation and factorizations in float32 (issue 15's --precision):
    # what it changes in perplexity and in the quantization loop's time.
    ("default", "the default command (no flags)", []),
    ("default_fp32", "default, --precision float32", ["--precision", "float32"]),
    # Unquantized tensors stored in float32 instead of the source-derived default (bf16 for GGUF).
    ("default_f32store", "default, --dtype float32", ["--dtype", "float32"]),
    # Block-output reconstruction of the scales on top of the default (issue 16).
    *[
        (
            f"rb{n}" + (f"_lr{lr}" if lr else "") + (f"_bs{bs}" if bs else ""),
            f"default + --refine-block {n}"
            + (f" --refine-lr {lr}" if lr else "")
            + (f" --batch-size {bs}" if bs else ""),
            ["--refine-block", str(n)]
            + (["--refine-lr", lr] if lr else [])
            + (["--batch-size", bs] if bs else []),
        )
        for n, lr, bs in (
            (25, "", ""),
            (25, "2e-2", ""),
            (50, "2e-2", "4"),
            (100, "2e-2", "2"),
            (100, "", ""),
            (100, "2e-2", ""),
        )
    ],
]
FLAGS = {k: f for k, _, f in ROWS}
LABELS = {k: lab for k, lab, _ in ROWS}


def worker(stats_json: str, quantize_args: list[str]) -> int:
    """Quantize as the CLI would; write the run summary, summed timings and per-linear stats."""
    import torch

    torch.set_num_threads(1)
    job = quantize_like_cli(quantize_args)
    stats = job.result.stats
    # time_refine is the block's time, repeated on each of its linears: count it once per block.
    blocks = {n.rsplit(".", 2)[0]: s.get("time_refine", 0.0) for n, s in stats.items()}
    out = {
        **job.summary,
        **{k: sum(s[k] for s in stats.values()) for k in ("time_grid", "time_gptq", "time_stage2")},
        "time_refine": sum(blocks.values()),
        "linears_stats": stats,
    }
    Path(stats_json).write_text(json.dumps(out, indent=1))
    return 0


def count_scales(ckpt: Path) -> dict[str, int]:
    """Negative and zero scales over every `*.scales` tensor of a checkpoint, and per projection."""
    from safetensors import safe_open

    neg, zero, total, by_proj = 0, 0, 0, {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as t:
            for key in t.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.endswith(".scales"):
                    s = t.get_tensor(key).float()
                    n = int((s < 0).sum())
                    neg, zero, total = neg + n, zero + int((s == 0).sum()), total + s.numel()
                    proj = key.rsplit(".", 2)[-2]
                    by_proj[proj] = by_proj.get(proj, 0) + n
    return {"negative": neg, "zero": zero, "total": total, "negative_by_proj": by_proj}


def summarize_linears(stats: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median energy ratio and relative error per projection kind, before and after stage 2."""
    out: dict[str, dict[str, float]] = {}
    kinds = sorted({n.rsplit(".", 1)[-1] for n in stats})
    for kind in kinds:
        rows = [s for n, s in stats.items() if n.endswith("." + kind) and "rel_error" in s]
        if rows:
            out[kind] = {
                k: statistics.median(r[k] for r in rows)
                for k in ("energy_ratio_gptq", "energy_ratio", "rel_error_gptq", "rel_error")
            }
            if "stage2_at_bound" in rows[0]:
                out[kind]["at_bound"] = statistics.mean(r["stage2_at_bound"] for r in rows)
    return out


def _isa() -> str:
    import torch

    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ),
        [],
    )
    avx = sorted(f for f in flags if f.startswith(("avx512", "avx2", "amx")))
    return (
        f"avx512_bf16 supported: {torch.cpu._is_avx512_bf16_supported()}; flags: "
        f"{' '.join(avx) or 'none'}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cells", nargs="+", default=["2:64", "3:64"], help="BITS:GROUP cells")
    p.add_argument("--rows", nargs="+", default=[k for k, _, _ in ROWS], choices=list(FLAGS))
    p.add_argument(
        "--tag",
        default="",
        help="suffix for rows run with a non-default calibration, e.g. seqlen512",
    )
    p.add_argument("--workdir", default="/tmp/tsq-stage2")
    p.add_argument("--results", default=str(RESULTS / "stage2_variants.jsonl"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--worker", metavar="STATS_JSON", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    # One torch thread per process: on a shared 2-core machine, two OpenMP threads that keep losing
    # their core to other jobs made a whole-layer quantization up to 8x slower than one thread.
    os.environ["OMP_NUM_THREADS"] = "1"
    if args.worker:
        return worker(args.worker, rest[1:] if rest[:1] == ["--"] else rest)
    results = Path(args.results)
    done = read_rows(results)
    note = "python benchmarks/stage2_variants.py"
    if args.report_only:
        for r in done:  # per-linear stats kept in the workdir may carry more than the results file
            f = Path(args.workdir) / f"int{r['bits']}-g{r['group_size']}-{r['row']}.linears.json"
            if r["row"] != "fp" and f.exists():
                r["linear_summary"] = summarize_linears(json.loads(f.read_text()))
        write_report(done, RESULTS / "stage2_variants.md", note, LABELS)
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    setup = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}
    calib = wiki_calib_args(args.nsamples, args.seqlen, args.seed)
    ev = ["--seqlen", "512", "--max-tokens", "8192"]
    isa, machine = _isa(), _machine()

    def evaluate(model: str, tag: str) -> dict:
        return run_eval(model, tag, work, ev)[0]

    def record(entry: dict) -> None:
        entry = {
            **entry,
            "load": os.getloadavg()[0],
            "machine": machine,
            "isa": isa,
            "when": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        }
        append_row(results, done, entry)
        write_report(done, RESULTS / "stage2_variants.md", note, LABELS)

    cells = [tuple(map(int, c.split(":"))) for c in args.cells]
    for key in args.rows:
        for bits, gs in cells:
            row = key + (f"@{args.tag}" if args.tag else "")
            if any(
                r["row"] == row
                and r["bits"] == bits
                and r["group_size"] == gs
                and r["setup"] == setup
                for r in done
            ):
                continue
            tag = f"int{bits}-g{gs}-{row}"
            ckpt = work / tag
            qargs = smollm2_quantize_args(bits, gs, [*calib, *FLAGS[key]], ckpt)
            fields, cmd = quantize_row(__file__, work, tag, qargs)
            per_linear = fields.pop("linears_stats")
            entry = {
                "row": row,
                "bits": bits,
                "group_size": gs,
                "setup": setup,
                **fields,
                "command": cmd,
                "scales": count_scales(ckpt),
                "linear_summary": summarize_linears(per_linear),
                "eval": evaluate(str(ckpt), tag),
            }
            (work / f"{tag}.linears.json").write_text(json.dumps(per_linear))
            shutil.rmtree(ckpt)  # written by this script; only its numbers are kept
            record(entry)
            print(
                f"{row:>14} INT{bits} g{gs}: ppl {entry['eval']['ppl']:.3f}, quantize "
                f"{entry['quantize_seconds']:.0f}s, negative scales {entry['scales']['negative']}",
                flush=True,
            )
    if not any(r["row"] == "fp" for r in done):
        record(
            {
                "row": "fp",
                "bits": None,
                "group_size": None,
                "setup": setup,
                "eval": evaluate("smollm2", "fp"),
                "scales": {"negative": 0, "zero": 0, "total": 0},
                "quantize_seconds": 0,
                "time_stage2": 0,
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
