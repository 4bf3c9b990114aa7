"""SmolLM2-135M INT3 g64: two-stage quantization vs plain GPTQ, perplexity on the wiki test split.

    OMP_NUM_THREADS=1 python benchmarks/quantize_smollm2.py --nsamples 64 --seqlen 256 \\
        --eval-tokens 16384

Every configuration goes through the same CLI (`python -m tsq_vllm.quantize`, then
`python -m tsq_vllm.eval`) with the same calibration windows (same --calib, --nsamples, --seqlen
and --seed), one subprocess each, so wall time and peak RSS (from wait4) are per run. Writes
benchmarks/results/quantize_smollm2.md with the numbers, the exact commands and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from accuracy import wiki_calib_args  # benchmarks/ is on sys.path as the script's directory

ROOT = Path(__file__).resolve().parents[1]

# (key, label, extra quantize flags); the first two are the comparison the issue asks for.
CONFIGS = [
    ("gptq", "plain GPTQ (min-max scales, no stages)", ["--no-stage1", "--no-stage2"]),
    ("tsq", "GPTQ + stage 1 + stage 2 (with R)", []),
]
ABLATIONS = [
    (
        "gptq-mse",
        "plain GPTQ, MSE scale search p=2.4 (GPTQModel's best)",
        ["--no-stage1", "--no-stage2", "--scale-search", "mse", "--mse-norm", "2.4"],
    ),
    ("stage1", "GPTQ + stage 1", ["--no-stage2"]),
    ("stage12-noR", "GPTQ + stage 1 + stage 2 without R", ["--no-error-feedback"]),
]


def run(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit status) of one subprocess, its output kept in `log`."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, proc.returncode


def shell(cmd: list[str]) -> str:
    env = (
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
        if "OMP_NUM_THREADS" in os.environ
        else ""
    )
    return env + " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--eval-tokens", type=int, default=16384, help="wiki test tokens to evaluate")
    p.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also run GPTQ+MSE 2.4, stage 1 only, stages without R",
    )
    p.add_argument(
        "--workdir", default="/tmp/tsq-bench-smollm2", help="where checkpoints and logs go"
    )
    p.add_argument(
        "--output",
        default=str(ROOT / "benchmarks/results/quantize_smollm2.md"),
        help="markdown report",
    )
    args = p.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    common = ["--model", "smollm2", "--bits", "3", "--group-size", "64",
              *wiki_calib_args(args.nsamples, args.seqlen, 0), "--overwrite"]  # fmt: skip
    ev = ["--seqlen", str(args.eval_seqlen), "--max-tokens", str(args.eval_tokens)]
    load_before = os.getloadavg()
    rows, commands = [], []

    def evaluate(key: str, model: str) -> dict:
        cmd = [
            py,
            "-m",
            "tsq_vllm.eval",
            "--model",
            model,
            *ev,
            "--output-json",
            str(work / f"{key}.eval.json"),
        ]
        commands.append(shell(cmd))
        wall, rss, rc = run(cmd, work / f"{key}.eval.log")
        if rc:
            raise SystemExit(
                f"evaluation of {key} failed (exit {rc}): see {work / f'{key}.eval.log'}"
            )
        res = json.loads((work / f"{key}.eval.json").read_text())
        return {**res, "eval_wall": wall, "eval_rss": rss}

    fp = evaluate("fp", "smollm2")
    rows.append(("fp", "full precision (GGUF Q4_1 dequantized to fp32)", None, None, fp))
    for key, label, flags in CONFIGS + (ABLATIONS if args.ablations else []):
        out = work / key
        cmd = [py, "-m", "tsq_vllm.quantize", *common, *flags, "--output", str(out)]
        commands.append(shell(cmd))
        wall, rss, rc = run(cmd, work / f"{key}.quantize.log")
        if rc:
            raise SystemExit(
                f"quantization {key} failed (exit {rc}): see {work / f'{key}.quantize.log'}"
            )
        rows.append((key, label, wall, rss, evaluate(key, str(out))))
        print(
            f"{key}: ppl {rows[-1][4]['ppl']:.3f}, quantize {wall:.0f}s, peak RSS {rss:.0f} MiB",
            flush=True,
        )

    by_key = {r[0]: r[4]["ppl"] for r in rows}
    gap = by_key["tsq"] - by_key["gptq"]
    verdict = (
        f"met: both stages {by_key['tsq']:.3f} < plain GPTQ {by_key['gptq']:.3f} ({gap:+.3f})"
        if gap < 0
        else f"missed by {gap:.3f} ppl: both stages {by_key['tsq']:.3f} vs plain GPTQ "
        f"{by_key['gptq']:.3f}"
    )
    lines = [
        "# SmolLM2-135M INT3 g64: two-stage vs plain GPTQ",
        "",
        "Generated by `benchmarks/quantize_smollm2.py` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Machine: {cpu_name()}, {os.cpu_count()} CPUs (shared with other jobs; load average "
        f"{load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, Python "
        f"{platform.python_version()}.",
        f"Calibration: wiki calibration split, {args.nsamples} windows x {args.seqlen} tokens, "
        f"seed 0. Evaluation: wiki test split, {fp['windows']} windows x {args.eval_seqlen} "
        f"tokens ({fp['tokens']} predicted tokens).",
        "",
        f"Goal (both stages < plain GPTQ perplexity): **{verdict}**.",
        "",
        "| run | configuration | wiki-test ppl | vs FP | quantize wall (s) | quantize peak RSS "
        "(MiB) | eval wall (s) | eval peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, label, wall, rss, res in rows:
        delta = "" if key == "fp" else f"{res['ppl'] - fp['ppl']:+.3f}"
        qwall = "" if wall is None else f"{wall:.0f}"
        qrss = "" if rss is None else f"{rss:.0f}"
        lines.append(
            f"| {key} | {label} | {res['ppl']:.3f} | {delta} | {qwall} | {qrss} | "
            f"{res['eval_wall']:.0f} | {res['eval_rss']:.0f} |"
        )
    lines += ["", "Commands, in the order run:", "", "```", *commands, "```", ""]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines))
    print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
