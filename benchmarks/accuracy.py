"""Accuracy and cost of every stage on SmolLM2-135M: the paper's Table 3 ablation, plus GPTQModel.

    python benchmarks/accuracy.py                     # tsq rows (and peers if their venv exists)
    bash benchmarks/setup_gptqmodel.sh                # once: GPTQModel 7.7.0 in its own venv
    python benchmarks/accuracy.py --report-only       # rewrite the report from the results file

For bits {2, 3} x group size {32, 64} it quantizes SmolLM2-135M with RTN, plain GPTQ, GPTQ + stage
1, GPTQ + stage 2, both stages, and both stages without the error-feedback term R, each in its own
process through `tsq_vllm.quantize`'s CLI parser and `run_quantization` (so every row is the CLI's
code path), then evaluates each checkpoint with `python -m tsq_vllm.eval` on the wiki test split.
Peer rows run GPTQModel 7.7.0 (`benchmarks/gptqmodel_peer.py`, in benchmarks/.venv-gptqmodel) and
AutoRound (`benchmarks/autoround_peer.py`, in benchmarks/.venv-autoround, `bash
benchmarks/setup_autoround.sh`) on the same fp32 weights and the *same calibration token windows*
(exported once to safetensors), and evaluate what they write with the same evaluator.

Every finished row is appended to a JSON-lines file, so an interrupted run resumes where it stopped;
the markdown report and PNG plot are rewritten from that file after every row.

`--model PATH.gguf|DIR --tag NAME` runs the same grid on another model: its rows go to
`accuracy_NAME.{jsonl,md,png}` and its checkpoints to `/tmp/tsq-accuracy-NAME`, so the SmolLM2
results are never mixed with it (benchmarks/fetch_qwen_gguf.sh assembles Qwen2.5-Coder-1.5B).
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
# This checkout's tsq_vllm, not an installed one (a worktree shares the venv of another checkout),
# here and in every row's subprocess.
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
)
# Each peer tool: (its venv's python, its script, the setup script that creates the venv).
PEER_TOOLS = {
    "gptqmodel": ("benchmarks/.venv-gptqmodel/bin/python", "benchmarks/gptqmodel_peer.py",
                  "benchmarks/setup_gptqmodel.sh"),
    "autoround": ("benchmarks/.venv-autoround/bin/python", "benchmarks/autoround_peer.py",
                  "benchmarks/setup_autoround.sh"),
}  # fmt: skip

# The paper's settings (the defaults before GPTAQ, damped R, the scale box and act-order): the
# Table 3 rows keep them pinned, so rows recorded before the defaults changed stay comparable.
PAPER = [
    "--gptaq-alpha", "0", "--error-feedback-alpha", "1", "--scale-box", "0",
    "--gptq-order", "natural",
]  # fmt: skip
# (key, label, extra `python -m tsq_vllm.quantize` flags), in the paper's Table 3 order, then the
# current default command (no flags).
TSQ_ROWS = [
    ("rtn", "RTN (min-max, no GPTQ)", ["--no-gptq", "--no-stage1", "--no-stage2", *PAPER]),
    ("gptq", "GPTQ (min-max scales)", ["--no-stage1", "--no-stage2", *PAPER]),
    ("gptq_s1", "GPTQ + stage 1", ["--no-stage2", *PAPER]),
    ("gptq_s2", "GPTQ + stage 2", ["--no-stage1", *PAPER]),
    ("tsq", "GPTQ + stage 1 + stage 2 (paper: R, no box)", PAPER),
    ("tsq_noR", "GPTQ + stage 1 + stage 2, no R", ["--no-error-feedback", *PAPER]),
    ("default", "tsq default (act-order, GPTAQ 0.25, R 0.25, box 2)", []),
    (
        "default_natural",
        "tsq default in input order (the previous default)",
        ["--gptq-order", "natural"],
    ),
]
# (key, label, peer script flags); PEER_TOOL names each row's tool.
PEER_ROWS = [
    ("gptqmodel", "GPTQModel 7.7 defaults", []),
    ("gptqmodel_mse", "GPTQModel 7.7 mse=2.4", ["--mse", "2.4"]),
    # GPTQModel's GPTAQ switch (QuantizeConfig(gptaq=GPTAQConfig(alpha))) at its default alpha,
    # with mse=2.4: its best scale search here, so this is GPTAQ as a user would run it best.
    ("gptqmodel_gptaq", "GPTQModel 7.7 GPTAQ (alpha 0.25) + mse=2.4",
     ["--gptaq-alpha", "0.25", "--mse", "2.4"]),
    # AutoRound's light recipe: 50 iterations with lr 5e-3 (its default lr would be 1/iters).
    ("autoround_i50", "AutoRound 0.16.1 iters=50 (light recipe: lr 5e-3)",
     ["--iters", "50", "--lr", "5e-3"]),
    ("autoround_i200", "AutoRound 0.16.1 iters=200 (its default: lr 1/200)", ["--iters", "200"]),
]  # fmt: skip
PEER_TOOL = {k: "autoround" if k.startswith("autoround") else "gptqmodel" for k, _, _ in PEER_ROWS}
# Order of work: the rows the goals compare first, so a cut-short run still answers them.
RUN_ORDER = ["gptq", "default", "default_natural", "tsq", "rtn", "gptq_s1", "gptq_s2", "tsq_noR"]
LABELS = {k: lab for k, lab, _ in TSQ_ROWS + PEER_ROWS}
ORDER = [k for k, _, _ in TSQ_ROWS + PEER_ROWS]


def _shell(cmd: list[str]) -> str:
    return (
        " ".join(shlex.quote(c) for c in cmd)
        .replace(sys.executable, "python")
        .replace(str(ROOT) + "/", "")
    )


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT) -> float:
    """Wall seconds of one subprocess; its output goes to `log`; a failure stops the benchmark."""
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env).returncode
    if rc:
        raise SystemExit(f"{_shell(cmd)} failed (exit {rc}); see {log}")
    return time.perf_counter() - start


def smollm2_quantize_args(
    bits: int, gs: int, flags: list[str], output: Path, model: str = "smollm2"
) -> list[str]:
    """`python -m tsq_vllm.quantize` arguments of one grid row on `model` (default: the embedded
    SmolLM2; calibration flags are part of `flags`)."""
    return ["--model", model, "--bits", str(bits), "--group-size", str(gs), *flags,
            "--output", str(output), "--overwrite"]  # fmt: skip


def run_eval(model: str, tag: str, work: Path, eval_args: list[str]) -> tuple[dict, str]:
    """Perplexity of `model` with `python -m tsq_vllm.eval`: its JSON result and the command."""
    out = work / f"{tag}.eval.json"
    cmd = [sys.executable, "-m", "tsq_vllm.eval", "--model", model, *eval_args,
           "--output-json", str(out)]  # fmt: skip
    _run(cmd, work / f"{tag}.eval.log")
    return json.loads(out.read_text()), _shell(cmd)


def wiki_calib_args(nsamples: int, seqlen: int, seed: int) -> list[str]:
    """The `python -m tsq_vllm.quantize` calibration flags every grid row shares."""
    return ["--calib", "wiki", "--nsamples", str(nsamples), "--seqlen", str(seqlen),
            "--seed", str(seed)]  # fmt: skip


def quantize_row(script: str, work: Path, tag: str, qargs: list[str]) -> tuple[dict, str]:
    """Quantize one row in a `script --worker` subprocess (log: TAG.quantize.log in `work`): its
    wall seconds with what the worker wrote, and the equivalent `python -m tsq_vllm.quantize`."""
    stats = work / f"{tag}.stats.json"
    wall = _run(
        [sys.executable, script, "--worker", str(stats), "--", *qargs], work / f"{tag}.quantize.log"
    )
    fields = {"process_seconds": wall, **json.loads(stats.read_text())}
    return fields, _shell([sys.executable, "-m", "tsq_vllm.quantize", *qargs])


def read_rows(results: Path) -> list[dict]:
    """The finished rows of a JSON-lines results file; none before its first row."""
    return (
        [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    )


def append_row(results: Path, done: list[dict], entry: dict) -> None:
    """One finished row, kept in `done` and appended to the results file (so a rerun resumes)."""
    done.append(entry)
    with results.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def quantize_like_cli(quantize_args: list[str]):
    """The QuantizationJob of one quantization in this process, through the CLI's parser and
    `run_quantization` (the code path of `python -m tsq_vllm.quantize`)."""
    import logging

    from tsq_vllm.quantize.__main__ import parse_options
    from tsq_vllm.quantize.run import run_quantization

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    opts, _ = parse_options(quantize_args)
    return run_quantization(opts, progress=False)


def worker(stats_json: str, quantize_args: list[str]) -> int:
    """Run one quantization as the CLI would and write its timings, summed over linears, as JSON."""
    job = quantize_like_cli(quantize_args)
    stats = job.result.stats.values()
    out = {
        **job.summary,
        **{k: sum(s[k] for s in stats) for k in ("time_grid", "time_gptq", "time_stage2")},
    }
    Path(stats_json).write_text(json.dumps(out, indent=1))
    return 0


def export_hf_model(hf_dir: Path, dtype, model_arg: str = "smollm2") -> None:
    """A GGUF model (default: the embedded SmolLM2) as a plain HF directory in `dtype` (kept if
    already there)."""
    from tsq_vllm.models import load_model, load_tokenizer, resolve_source

    if (hf_dir / "config.json").exists():
        return
    src = resolve_source(model_arg)
    model = load_model(src).to(dtype)
    # The weights are plain tensors once loaded; only the GGUF origin marks them "quantized".
    model.hf_quantizer, model.is_quantized = None, False
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(hf_dir)
    load_tokenizer(src).save_pretrained(hf_dir)


def export_peer_inputs(
    work: Path, nsamples: int, seqlen: int, seed: int, model_arg: str = "smollm2"
) -> tuple[Path, Path]:
    """The model as an fp32 HF directory and the calibration windows tsq uses, for GPTQModel."""
    import torch
    from safetensors.torch import save_file

    from tsq_vllm.data import load_documents, sample_windows, tokenize_documents
    from tsq_vllm.models import load_tokenizer, resolve_source

    hf_dir, calib = work / "model-hf", work / f"calib-{nsamples}x{seqlen}-seed{seed}.safetensors"
    if model_arg == "smollm2":
        hf_dir = work / "smollm2-hf"  # the name earlier SmolLM2 runs used
    export_hf_model(hf_dir, torch.float32, model_arg)
    tok = load_tokenizer(resolve_source(model_arg))
    if not calib.exists():
        windows = sample_windows(
            tokenize_documents(tok, load_documents("wiki", split="calib")), nsamples, seqlen, seed
        )
        save_file({"input_ids": windows.contiguous()}, str(calib))
    return hf_dir, calib


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--nsamples", type=int, default=32, help="calibration windows (same for every row)"
    )
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--eval-tokens", type=int, default=16384, help="wiki test tokens to evaluate")
    p.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3], help="bit widths")
    p.add_argument("--group-sizes", type=int, nargs="+", default=[64, 32], help="group sizes")
    p.add_argument(
        "--rows",
        nargs="+",
        default=RUN_ORDER + [k for k, _, _ in PEER_ROWS],
        choices=ORDER,
        help="which rows to run",
    )
    p.add_argument(
        "--model", default="smollm2", help="model to quantize: 'smollm2', a .gguf file or HF dir"
    )
    p.add_argument(
        "--tag", default=None, help="name of a --model other than smollm2 in file names (required)"
    )
    p.add_argument("--workdir", default=None, help="checkpoints and logs (default: /tmp/...)")
    p.add_argument(
        "--results",
        default=None,
        help="JSON lines, one per finished row; the .md and .png are written beside it "
        "(default: benchmarks/results/accuracy[_TAG].jsonl)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="only rewrite the report from --results"
    )
    p.add_argument("--worker", metavar="STATS_JSON", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.worker:
        return worker(args.worker, rest[1:] if rest[:1] == ["--"] else rest)

    from accuracy_report import SMOLLM2, Subject, write_report  # benchmarks/ is on sys.path

    if args.model != "smollm2" and not args.tag:
        p.error("--model other than smollm2 needs --tag NAME (used in result file names)")
    suffix = f"_{args.tag}" if args.tag else ""
    subject = (
        SMOLLM2
        if args.model == "smollm2"
        else Subject(
            args.tag,
            f'`{Path(args.model).name}` (dequantized to fp32: that is "FP")',
            f" --model {args.model} --tag {args.tag}",
        )
    )
    results = Path(args.results or RESULTS / f"accuracy{suffix}.jsonl")
    md, png = results.with_suffix(".md"), results.with_suffix(".png")
    done = read_rows(results)
    if args.report_only:
        write_report(done, md, png, subject)
        return 0
    work = Path(args.workdir or f"/tmp/tsq-accuracy{suffix.replace('_', '-')}")
    work.mkdir(parents=True, exist_ok=True)
    calib = wiki_calib_args(args.nsamples, args.seqlen, args.seed)
    ev = ["--seqlen", str(args.eval_seqlen), "--max-tokens", str(args.eval_tokens)]
    setup = {
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "seed": args.seed,
        "eval_tokens": args.eval_tokens,
        "eval_seqlen": args.eval_seqlen,
    }

    def have(bits: int | None, gs: int | None, row: str) -> bool:
        return any(
            r["bits"] == bits and r["group_size"] == gs and r["row"] == row and r["setup"] == setup
            for r in done
        )

    def record(entry: dict) -> None:
        entry = {
            **entry,
            "setup": setup,
            "load": os.getloadavg()[0],
            "omp_threads": os.environ.get("OMP_NUM_THREADS", ""),
            "when": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            "machine": _machine(),
        }
        append_row(results, done, entry)
        write_report(done, md, png, subject)
        ppl = entry["eval"]["ppl"]
        print(
            f"{entry['row']:>14} bits={entry['bits']} g={entry['group_size']}: ppl {ppl:.3f}, "
            f"quantize {entry.get('quantize_seconds', 0):.0f}s",
            flush=True,
        )

    def evaluate(model: str, tag: str) -> dict:
        result, cmd = run_eval(model, tag, work, ev)
        return {**result, "command": cmd}

    if not have(None, None, "fp"):
        record({"row": "fp", "bits": None, "group_size": None, "eval": evaluate(args.model, "fp")})
    peers = []
    for row in [r for r in PEER_ROWS if r[0] in args.rows]:
        python, _, setup_sh = PEER_TOOLS[PEER_TOOL[row[0]]]
        if (ROOT / python).exists():
            peers.append(row)
        else:
            print(f"skipping peer row {row[0]}: {python} not found (run bash {setup_sh})")
    hf_dir, calib_file = (
        export_peer_inputs(work, args.nsamples, args.seqlen, args.seed, args.model)
        if peers
        else (None, None)
    )
    for bits in args.bits:
        for gs in args.group_sizes:
            for key in [k for k in RUN_ORDER if k in args.rows]:
                if have(bits, gs, key):
                    continue
                tag = f"int{bits}-g{gs}-{key}"
                flags = dict((k, f) for k, _, f in TSQ_ROWS)[key]
                qargs = smollm2_quantize_args(bits, gs, [*calib, *flags], work / tag, args.model)
                fields, cmd = quantize_row(__file__, work, tag, qargs)
                record(
                    {
                        "row": key,
                        "bits": bits,
                        "group_size": gs,
                        **fields,
                        "command": cmd,
                        "eval": evaluate(str(work / tag), tag),
                    }
                )
            for key, _, flags in peers:
                if have(bits, gs, key):
                    continue
                tag = f"int{bits}-g{gs}-{key}"
                stats = work / f"{tag}.stats.json"
                python, script, _ = PEER_TOOLS[PEER_TOOL[key]]
                cmd = [
                    str(ROOT / python),
                    str(ROOT / script),
                    "--model",
                    str(hf_dir),
                    "--calib",
                    str(calib_file),
                    "--bits",
                    str(bits),
                    "--group-size",
                    str(gs),
                    *flags,
                    "--output",
                    str(work / tag),
                    "--stats-json",
                    str(stats),
                ]
                # GPTQModel 7.7 refuses fewer than 2 CPU workers (its model-loader pool asks for 2);
                # pinned to one core with one torch thread, the two share that core.
                prefix = "GPTQMODEL_CPU_WORKERS=2 " if PEER_TOOL[key] == "gptqmodel" else ""
                env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}
                wall = _run(
                    cmd, work / f"{tag}.quantize.log", env=env, cwd=work
                )  # GPTQModel writes logs/ in cwd
                record(
                    {
                        "row": key,
                        "bits": bits,
                        "group_size": gs,
                        "process_seconds": wall,
                        **json.loads(stats.read_text()),
                        "command": prefix + _shell(cmd),
                        "eval": evaluate(str(work / tag), tag),
                    }
                )
    return 0


def _machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
