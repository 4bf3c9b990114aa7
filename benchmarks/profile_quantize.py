"""Where the quantization loop's time goes: plain GPTQ against the default, under cProfile.

    OMP_NUM_THREADS=1 python benchmarks/profile_quantize.py            # run both, then report
    python benchmarks/profile_quantize.py --report-only                # summarize existing .prof
    OMP_NUM_THREADS=1 python benchmarks/profile_quantize.py --time 2   # no profiler: A/B/A/B...

Each configuration runs `python -m tsq_vllm.quantize` on the embedded SmolLM2-135M (INT3 g64, the
accuracy grid's 32 × 256 calibration) in its own process under cProfile, writing
`<workdir>/<name>.prof`. The report splits the quantization loop (`quantize_model`) into the
second-moment accumulation (H, R, D), the decoder-layer forward passes (both streams, the input
captures and the replays), the per-linear math (`quantize_weight`: grid search, GPTQ, GPTAQ's
target, stage 2) and the rest. cProfile adds overhead to every Python call, so the absolute times
are above an unprofiled run's; the split is what this measures. Writes
benchmarks/results/profile_quantize.md.

`--time N` runs the configurations alternately N times each without the profiler (so both see the
same machine load, on a shared machine) and reports the median of the CLI's own "quantize" time
(the loop, without load and write) and the ratio of the medians; it writes
benchmarks/results/quantize_cost.md.
"""

from __future__ import annotations

import argparse
import os
import pstats
import re
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from accuracy import _machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
BASE = ["--model", "smollm2", "--bits", "3", "--group-size", "64", "--calib", "wiki",
        "--nsamples", "32", "--seqlen", "256", "--seed", "0"]  # fmt: skip
CONFIGS = {
    "gptq": ("plain GPTQ (min-max scales)", ["--no-stage1", "--no-stage2", "--gptaq-alpha", "0"]),
    "default": ("the default (GPTAQ 0.25, stage 1, stage 2 with R 0.25, box 2)", []),
}
# (part, (file suffix, function name) of the calls whose cumulative time it is)
PARTS = [
    ("H/R/D accumulation", ("core/hessian.py", "add")),
    ("decoder-layer forwards", ("modeling_layers.py", "__call__")),
    ("per-linear math (quantize_weight_on)", ("quantize/layer.py", "quantize_weight_on")),
]
# The per-linear math split by step (each a part of the per-linear column above).
STEPS = [
    ("GPTAQ target", [("core/gptq.py", "asymmetric_target")]),
    ("stage-1 scale search", [("core/grid.py", "search_grid")]),
    ("GPTQ loop", [("core/gptq.py", "gptq_quantize")]),
    ("stage 2 (system, descent, stats)",
     [("core/stage2.py", "scale_system"), ("core/stage2.py", "refine_system"),
      ("core/stage2.py", "output_stats")]),
]  # fmt: skip
LOOP = ("quantize/pipeline.py", "quantize_model")


def _cumulative(stats: pstats.Stats, where: tuple[str, str]) -> float:
    """Cumulative seconds of the function `where` names (summed over its entries)."""
    table = stats.stats  # type: ignore[attr-defined]
    return sum(
        v[3] for (f, _line, name), v in table.items() if f.endswith(where[0]) and name == where[1]
    )


def report(work: Path, names: list[str]) -> str:
    rows = []
    for name in names:
        stats = pstats.Stats(str(work / f"{name}.prof"))
        loop = _cumulative(stats, LOOP)
        parts = [_cumulative(stats, w) for _, w in PARTS]
        rows.append((name, loop, parts))
    base = dict((n, loop) for n, loop, _ in rows).get("gptq")
    head = "| run | loop (s) | × GPTQ | " + " | ".join(p for p, _ in PARTS) + " | rest |"
    lines = [head, "|" + "---|" * (4 + len(PARTS))]
    for name, loop, parts in rows:
        cells = [f"{t:.1f} ({100 * t / loop:.0f} %)" for t in parts]
        rest = loop - sum(parts)
        ratio = f"{loop / base:.2f}" if base else ""
        lines.append(
            f"| {CONFIGS[name][0]} | {loop:.1f} | {ratio} | "
            + " | ".join(cells)
            + f" | {rest:.1f} ({100 * rest / loop:.0f} %) |"
        )
    lines += ["", "| run | " + " | ".join(p for p, _ in STEPS) + " |"]
    lines.append("|---|" + "---|" * len(STEPS))
    for name in names:
        stats = pstats.Stats(str(work / f"{name}.prof"))
        cells = [sum(_cumulative(stats, w) for w in where) for _, where in STEPS]
        lines.append(f"| {CONFIGS[name][0]} | " + " | ".join(f"{t:.1f}" for t in cells) + " |")
    return "\n".join(lines)


def _quantize_seconds(log: str) -> float:
    """The CLI summary's "quantize Ns" (`wrote DIR: ...; load Ns, quantize Ns, ...`)."""
    m = re.search(r"^wrote .*\bquantize (\d+)s", log, re.M)
    if m is None:
        raise SystemExit("no summary line in the quantize log")
    return float(m.group(1))


def _quantize_args(work: Path, name: str) -> list[str]:
    """`python -m tsq_vllm.quantize` arguments (after `-m`) of configuration `name`."""
    return ["tsq_vllm.quantize", *BASE, *CONFIGS[name][1], "--output", str(work / name),
            "--overwrite"]  # fmt: skip


def _shown(cmd: list[str]) -> str:
    return " ".join(cmd).replace(sys.executable, "python")


def time_configs(work: Path, names: list[str], repeat: int) -> list[str]:
    """Markdown lines: the median quantize time of each configuration over `repeat` alternating
    runs, and each run's time in order."""
    runs: dict[str, list[float]] = {n: [] for n in names}
    cmds = {}
    for _ in range(repeat):
        for name in names:
            cmd = [sys.executable, "-m", *_quantize_args(work, name)]
            cmds[name] = _shown(cmd)
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
            runs[name].append(_quantize_seconds(out.stdout + out.stderr))
    base = statistics.median(runs[names[0]])
    lines = ["| run | quantize loop, median (s) | each run, in order (s) | × " + names[0] + " |"]
    lines.append("|---|---|---|---|")
    for name in names:
        med = statistics.median(runs[name])
        each = ", ".join(f"{t:.0f}" for t in runs[name])
        lines.append(f"| {CONFIGS[name][0]} | {med:.0f} | {each} | {med / base:.2f} |")
    return [*lines, "", "Commands:", "", *[f"- `{c}`" for c in cmds.values()]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/tsq-profile")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--note", default="", help="a line for the report (e.g. the commit profiled)")
    p.add_argument("--time", type=int, default=0, metavar="N", help="time N alternating runs")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.time:
        import torch

        lines = time_configs(work, args.configs, args.time)
        head = [
            "# Quantization cost: plain GPTQ against the default (SmolLM2-135M INT3 g64, 32 × 256)",
            "",
            f"Generated by `python benchmarks/profile_quantize.py --time {args.time}` on "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {_machine()}, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', '')}, ISA: avx512_bf16 supported: "
            f"{torch.cpu._is_avx512_bf16_supported()}. Runs alternate, so both configurations "
            "see the same load on this shared machine; the time is the CLI's quantize loop.",
            *([args.note] if args.note else []),
            "",
        ]
        (RESULTS / "quantize_cost.md").write_text("\n".join(head + lines) + "\n")
        return 0
    commands = []
    for name in args.configs:
        prof = str(work / f"{name}.prof")
        cmd = [sys.executable, "-m", "cProfile", "-o", prof, "-m", *_quantize_args(work, name)]
        commands.append(_shown(cmd))
        if not args.report_only:
            with (work / f"{name}.log").open("w") as log:
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, check=True)
    import torch

    md = [
        "# Where the quantization loop's time goes (SmolLM2-135M INT3 g64, 32 × 256 calibration)",
        "",
        f"Generated by `python benchmarks/profile_quantize.py` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {_machine()} "
        f"(shared; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}); "
        f"ISA: avx512_bf16 supported: {torch.cpu._is_avx512_bf16_supported()}. "
        "Times are cProfile's (inflated by its per-call overhead); the split is the measurement.",
        *([args.note] if args.note else []),
        "",
        report(work, args.configs),
        "",
        "Commands:",
        "",
        *[f"- `{c}`" for c in commands],
        "",
    ]
    (RESULTS / "profile_quantize.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
