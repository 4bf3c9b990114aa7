"""Where a decode step's time goes: torch profiler over vLLM's engine, bf16 vs a tsq checkpoint.

    python benchmarks/profile_decode.py                       # uses serve_bench's work directory
    python benchmarks/profile_decode.py --model bf16=DIR --model "tsq INT4=DIR"
    python benchmarks/profile_decode.py --model ... --streams 16   # 16 prompts decoded together

For each model, in its own process: `vllm.LLM` in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so the
profiler sees the model's ops), `--dtype bfloat16 --enforce-eager --max-model-len 512`, one warm-up
generation, three timed generations without the profiler (median tok/s), then one generation of the
same --max-tokens greedy tokens under `torch.profiler`; every generation decodes --streams copies of
the prompt together (a step makes one token of each). Reported per model: the ops with the most
self CPU time, in ms and calls per step (the profiler's own overhead inflates the many small ops;
the timed run is the clean figure). Writes benchmarks/results/profile_decode.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def profile(
    model_dir: str, quantized: bool, max_tokens: int, top: int, cores: str, streams: int
) -> dict:
    """Timed tok/s and the top ops by self CPU time for one model (runs vLLM in this process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM binds its OpenMP threads itself (and disables torch.set_num_threads afterwards).
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores
    from serve_bench import PROMPT, make_llm  # benchmarks/ is on sys.path as the script's directory
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from vllm import SamplingParams

    llm = make_llm(model_dir, "tsq" if quantized else None)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [PROMPT] * streams
    llm.generate(prompts, params, use_tqdm=False)
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        runs.append(streams * max_tokens / (time.perf_counter() - t))
    tok_s = statistics.median(runs)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    ops = [
        {
            "op": e.key,
            "ms_per_step": e.self_cpu_time_total / 1e3 / max_tokens,
            "calls_per_step": e.count / max_tokens,
        }
        for e in events[:top]
    ]
    return {"tok_s": tok_s, "total_ms_per_step": total_us / 1e3 / max_tokens, "ops": ops}


def llamacpp_decode(gguf: Path, max_tokens: int, threads: int) -> float:
    """llama.cpp's decode tok/s for one sequence (`llama-bench -p 0 -n max_tokens`, 3 reps)."""
    from serve_llamacpp import BIN  # benchmarks/ is on sys.path as the script's directory

    cmd = [str(BIN / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(max_tokens)]
    cmd += ["-t", str(threads), "-r", "3", "-o", "json"]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return statistics.median(res[0]["samples_ts"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    work = "/tmp/tsq-serve-bench"
    p.add_argument(
        "--model",
        action="append",
        metavar="NAME=DIR",
        help=f"a model to profile; a NAME starting with 'tsq' is served with --quantization tsq "
        f"(default: bf16 and tsq INT4 from {work})",
    )
    p.add_argument(
        "--llamacpp",
        action="append",
        default=[],
        metavar="NAME=GGUF",
        help="also time llama.cpp's decode of GGUF (`llama-bench`, 1 thread and one per CPU)",
    )
    p.add_argument("--label", default="SmolLM2-135M", help="the model's name in the title")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per run")
    p.add_argument("--top", type=int, default=12, help="ops listed per model")
    p.add_argument("--streams", type=int, default=1, help="prompts decoded together")
    p.add_argument(
        "--cores",
        default="0",
        help="VLLM_CPU_OMP_THREADS_BIND for the engine; the default, core 0 alone, is what the "
        "server's engine core gets on this 2-core machine (vLLM keeps the other for the front end)",
    )
    p.add_argument(
        "--output",
        default=str(ROOT / "benchmarks/results/profile_decode.md"),
        help="markdown report",
    )
    p.add_argument(
        "--worker",
        nargs=3,
        metavar=("DIR", "QUANTIZED", "OUT_JSON"),
        help="internal: profile one model",
    )
    args = p.parse_args()
    if args.worker:
        res = profile(
            args.worker[0],
            args.worker[1] == "1",
            args.max_tokens,
            args.top,
            args.cores,
            args.streams,
        )
        Path(args.worker[2]).write_text(json.dumps(res))
        return 0

    models = [
        m.partition("=")[::2]
        for m in (args.model or [f"bf16={work}/smollm2-hf", f"tsq INT4 g64={work}/tsq-int4-g64"])
    ]
    for name, d in models:
        if not d or not (Path(d) / "config.json").exists():
            raise SystemExit(
                f"--model {name}={d}: no config.json there; run benchmarks/serve_bench.py first or "
                "pass NAME=DIR of a model directory"
            )
    flags = " ".join(sys.argv[1:])
    lines = [
        f"# Decode profile: {args.label} in vLLM-cpu, bf16 vs tsq",
        "",
        f"Generated by `python benchmarks/profile_decode.py{' ' + flags if flags else ''}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC (load average {os.getloadavg()[0]:.1f}). "
        f"serve_bench's prompt × {args.streams} decoded together, {args.max_tokens} greedy tokens "
        f"each, `vllm.LLM` in-process, `--dtype bfloat16 --enforce-eager`, "
        f"VLLM_CPU_OMP_THREADS_BIND={args.cores}. Self CPU time per step (one token of each "
        "prompt; the prefill's share included) under `torch.profiler` (its overhead inflates the "
        "many small ops); tok/s: all tokens / wall time, median of 3 runs without the profiler.",
        "",
    ]
    for name, d in models:
        out = Path(f"/tmp/tsq-profile-{os.getpid()}.json")
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            d,
            "1" if name.startswith("tsq") else "0",
            str(out),
            "--max-tokens",
            str(args.max_tokens),
            "--top",
            str(args.top),
            "--cores",
            args.cores,
            "--streams",
            str(args.streams),
        ]
        subprocess.run(
            cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        res = json.loads(out.read_text())
        out.unlink()
        lines += [
            f"## {name} (`{d}`)",
            "",
            f"{res['tok_s']:.1f} tok/s without the profiler (median of 3); "
            f"{res['total_ms_per_step']:.1f} ms self CPU per step under the profiler.",
            "",
            "| op | ms / step | calls / step |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| `{o['op']}` | {o['ms_per_step']:.2f} | {o['calls_per_step']:.1f} |"
            for o in res["ops"]
        ]
        lines.append("")
    for name, gguf in (m.partition("=")[::2] for m in args.llamacpp):
        lines += [f"## {name} (`{gguf}`), llama.cpp's `llama-bench`", ""]
        for threads in sorted({1, os.cpu_count() or 1}):
            tok_s = llamacpp_decode(Path(gguf), args.max_tokens, threads)
            lines.append(
                f"- {threads} thread{'s' if threads > 1 else ''}: {tok_s:.1f} tok/s, "
                f"{1000 / tok_s:.1f} ms per token (decode of {args.max_tokens} tokens, median "
                "of 3 repetitions)"
            )
        lines.append("")
    Path(args.output).write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
