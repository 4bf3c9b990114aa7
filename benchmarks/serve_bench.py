"""Serving throughput in vLLM (CPU): SmolLM2-135M in bf16 vs tsq INT4 / INT3 / INT2, side by side.

    python benchmarks/serve_bench.py                          # quantizes what it needs, ~15 min
    python benchmarks/serve_bench.py --checkpoint 3=DIR ...   # reuse existing tsq checkpoints

For each model, one at a time, it starts vLLM's OpenAI server (`python -m tsq_vllm.serve` for tsq
checkpoints; vLLM's own API server entry for the bf16 baseline), all with the same flags
(`--dtype bfloat16 --enforce-eager --max-model-len 512`, 1 GiB KV cache), sends one warm-up request,
then for 1, 4 and 16 concurrent streams runs --repeats rounds in which every stream sends one
streamed completion request (the same prompt, greedy, `ignore_eos`, exactly --max-tokens new
tokens) with the ordinary `openai` client. Per round: output tokens / round wall time; per request:
time to first token. Reported: the median over rounds of output tok/s, the median TTFT, and the
server's memory (PSS and RSS summed over the API server and its engine processes, after the
run). Then the same engine without the HTTP front end (`vllm.LLM.generate` on 1, 4, 16 prompts in
a child process), which separates the model's decode speed from the server's per-token overhead.
Writes benchmarks/results/serve.md, serve.png and serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from tsq_vllm.serve.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
COMMON = ["--host", "127.0.0.1", "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "512"]
PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
    "Within a few decades printing spread across Europe, and"
)


def _shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")


def _calibration(ckpt: Path) -> dict | None:
    cfg = ckpt / "quantize_config.json"
    return json.loads(cfg.read_text()).get("tsq", {}).get("calibration") if cfg.exists() else None


def prepare(
    work: Path, given: dict[int, str], calib: dict
) -> tuple[Path, dict[int, Path], list[str]]:
    """The bf16 baseline's HF directory and a tsq checkpoint per bit width; commands that made them.

    A checkpoint already in `work` is reused only if its quantize_config.json records the same
    calibration as `calib` (the `calibration` record's fields) asks for; the report lists its
    command either way.
    """
    import torch
    from accuracy import export_hf_model  # benchmarks/ is on sys.path as the script's directory

    commands = []
    hf = work / "smollm2-hf"
    export_hf_model(hf, torch.bfloat16)
    flags = [
        "--calib",
        calib["dataset"],
        *(a for k in ("nsamples", "seqlen", "seed") for a in (f"--{k}", str(calib[k]))),
    ]
    ckpts = {}
    for bits in (4, 3, 2):
        if bits in given:
            ckpts[bits] = Path(given[bits])
            commands.append(f"# INT{bits}: given checkpoint {given[bits]}")
            continue
        ckpts[bits] = work / f"tsq-int{bits}-g64"
        cmd = [
            sys.executable,
            "-m",
            "tsq_vllm.quantize",
            "--model",
            "smollm2",
            "--bits",
            str(bits),
            "--group-size",
            "64",
            *flags,
            "--output",
            str(ckpts[bits]),
            "--overwrite",
        ]
        commands.append(_shell(cmd))
        if _calibration(ckpts[bits]) != calib:
            subprocess.run(
                cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
    return hf, ckpts, commands


def memory_mib(pid: int) -> dict[str, float]:
    """PSS and RSS summed over process `pid` and every descendant (vLLM's engine core, workers)."""
    import psutil

    root = psutil.Process(pid)
    pss = rss = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        pss, rss = pss + info.pss, rss + info.rss
    return {"pss_mib": pss / 2**20, "rss_mib": rss / 2**20}


def _one_request(client, model: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": ttft, "tokens": tokens, "seconds": time.perf_counter() - t0}


def measure(server: ServerProcess, streams: list[int], repeats: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none", timeout=600)
    model = client.models.list().data[0].id
    _one_request(client, model, max_tokens)  # warm-up
    out = {}
    for n in streams:
        rounds, ttfts = [], []
        with ThreadPoolExecutor(n) as pool:
            for _ in range(repeats):
                t = time.perf_counter()
                reqs = list(pool.map(lambda _: _one_request(client, model, max_tokens), range(n)))
                wall = time.perf_counter() - t
                if any(r["tokens"] != max_tokens for r in reqs):
                    raise SystemExit(
                        f"a request returned {[r['tokens'] for r in reqs]} tokens, not {max_tokens}"
                    )
                rounds.append(sum(r["tokens"] for r in reqs) / wall)
                ttfts += [r["ttft"] for r in reqs]
        out[n] = {
            "tok_s": statistics.median(rounds),
            "tok_s_rounds": rounds,
            "ttft_s": statistics.median(ttfts),
        }
    return out


def make_llm(model_dir: str, quantization: str | None):
    """`vllm.LLM` with the servers' engine flags (COMMON): bf16, eager, 512-token context."""
    from vllm import LLM

    kwargs = {"quantization": quantization} if quantization else {}
    return LLM(model_dir, dtype="bfloat16", enforce_eager=True, max_model_len=512, **kwargs)


def engine_only(
    model_dir: str, quantization: str | None, streams: list[int], repeats: int, max_tokens: int
) -> dict:
    """Output tok/s of the same engine without the HTTP front end: `vllm.LLM.generate` on n prompts.

    Runs in its own process (`--engine-worker`), so the engine core gets the same process layout
    and thread binding as under the server; the difference to the server's figure is the cost of
    the API server, streaming and the client.
    """
    from vllm import SamplingParams

    llm = make_llm(model_dir, quantization)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([PROMPT], params, use_tqdm=False)  # warm-up
    out = {}
    for n in streams:
        rounds = []
        for _ in range(repeats):
            t = time.perf_counter()
            res = llm.generate([PROMPT] * n, params, use_tqdm=False)
            wall = time.perf_counter() - t
            rounds.append(sum(len(r.outputs[0].token_ids) for r in res) / wall)
        out[n] = {"tok_s": statistics.median(rounds), "tok_s_rounds": rounds}
    return out


def _run_engine_worker(
    model_dir: Path, quantization: str | None, args: argparse.Namespace, log: Path
) -> dict:
    result = log.with_suffix(".json")
    cmd = [
        sys.executable,
        __file__,
        "--engine-worker",
        str(model_dir),
        str(result),
        "--streams",
        *map(str, args.streams),
        "--repeats",
        str(args.repeats),
        "--max-tokens",
        str(args.max_tokens),
    ]
    if quantization:
        cmd += ["--quantization", quantization]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    return {int(n): v for n, v in json.loads(result.read_text()).items()}


def _plot(rows: list[dict], streams: list[int], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(streams))]
        a.bar(xs, [r["streams"][n]["tok_s"] for n in streams], width, label=r["name"])
        b.bar(xs, [1000 * r["streams"][n]["ttft_s"] for n in streams], width, label=r["name"])
    for ax, title in (
        (a, "output tokens/s (higher is better)"),
        (b, "median time to first token, ms"),
    ):
        ax.set_xticks(range(len(streams)), [f"{n} stream{'s' if n > 1 else ''}" for n in streams])
        ax.set_title(title, fontsize=10)
    a.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M in vLLM-cpu: bf16 vs tsq (g64)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _report(
    rows: list[dict], args: argparse.Namespace, commands: list[str], load_start: float
) -> list[str]:
    """The markdown report: goal verdicts, the served table, the engine-only table, rounds,
    commands."""
    import vllm

    streams, base, ebase = args.streams, rows[0]["streams"], rows[0]["engine"]
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = " ".join(sys.argv[1:])
    lines = [
        "# Serving throughput: SmolLM2-135M, bf16 vs tsq, vLLM on CPU",
        "",
        f"Generated by `python benchmarks/serve_bench.py{' ' + flags if flags else ''}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {cpu}, {os.cpu_count()} CPUs "
        f"(shared; load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end), vLLM "
        f"{vllm.__version__} (vllm-cpu), Python {platform.python_version()}.",
        f"Each request: a {len(PROMPT.split())}-word prompt, exactly {args.max_tokens} new tokens "
        "(greedy, `ignore_eos`), streamed. tok/s = all output tokens of a round / round wall "
        f"time, median of {args.repeats} rounds; TTFT = median over every request of the level. "
        "Memory: PSS (shared pages split between processes) and RSS summed over the server's "
        "process tree after the run; weights = the checkpoint's safetensors bytes. The models "
        "ran one after another in one invocation.",
        "",
        "## Goals (tsq ≥ 1.5× bf16 at 1 stream, ≥ 1.0× at 16 streams), through the OpenAI server",
        "",
    ]
    for r in rows[1:]:
        parts = []
        for n, goal in ((1, 1.5), (16, 1.0)):
            if n in r["streams"]:
                x = r["streams"][n]["tok_s"] / base[n]["tok_s"]
                parts.append(
                    f"{x:.2f}× at {n} stream{'s' if n > 1 else ''} "
                    f"({'met' if x >= goal else 'missed'})"
                )
        if 1 in r["engine"]:
            parts.append(
                f"engine only {r['engine'][1]['tok_s'] / ebase[1]['tok_s']:.2f}× at 1 stream"
            )
        lines.append(f"- {r['name']}: " + "; ".join(parts) + ".")
    lines += [
        "",
        "## Served (OpenAI server, streamed completions, `openai` client)",
        "",
        "| model | "
        + " | ".join(f"tok/s @{n} (× bf16)" for n in streams)
        + " | "
        + " | ".join(f"TTFT @{n} (ms)" for n in streams)
        + " | PSS (MiB) | RSS (MiB) | weights (MiB) | startup (s) |",
        "|---" * (1 + 2 * len(streams) + 4) + "|",
    ]
    for r in rows:
        s = r["streams"]
        lines.append(
            f"| {r['name']} | "
            + " | ".join(
                f"{s[n]['tok_s']:.1f} ({s[n]['tok_s'] / base[n]['tok_s']:.2f}×)" for n in streams
            )
            + " | "
            + " | ".join(f"{1000 * s[n]['ttft_s']:.0f}" for n in streams)
            + f" | {r['pss_mib']:.0f} | {r['rss_mib']:.0f} | {r['weights_mib']:.0f} | "
            f"{r['startup_s']:.0f} |"
        )
    lines += [
        "",
        "## Engine only (`vllm.LLM.generate` on n prompts, same engine flags, no HTTP)",
        "",
        "What the server's front end (API server process, streaming, the client on the same 2 "
        "cores) costs shows as the difference between this table and the one above.",
        "",
        "| model | " + " | ".join(f"tok/s @{n} (× bf16)" for n in streams) + " |",
        "|---" * (1 + len(streams)) + "|",
    ]
    for r in rows:
        e = r["engine"]
        lines.append(
            f"| {r['name']} | "
            + " | ".join(
                f"{e[n]['tok_s']:.1f} ({e[n]['tok_s'] / ebase[n]['tok_s']:.2f}×)" for n in streams
            )
            + " |"
        )
    lines += ["", "Rounds (tok/s) per level, served | engine only:", ""]
    for r in rows:
        lines.append(
            f"- {r['name']}: "
            + "; ".join(
                f"{n}: "
                + ", ".join(f"{v:.1f}" for v in r["streams"][n]["tok_s_rounds"])
                + " | "
                + ", ".join(f"{v:.1f}" for v in r["engine"][n]["tok_s_rounds"])
                for n in streams
            )
        )
    lines += [
        "",
        "Commands (VLLM_CPU_KVCACHE_SPACE=1 for every server):",
        "",
        "```",
        *commands,
        *(r["command"] for r in rows),
        "```",
        "",
    ]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16], help="concurrent streams")
    p.add_argument(
        "--repeats", type=int, default=3, help="rounds per concurrency level (median reported)"
    )
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request")
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="BITS=DIR",
        help="use this tsq checkpoint for BITS instead of quantizing one",
    )
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows when quantizing")
    p.add_argument(
        "--seqlen", type=int, default=256, help="calibration window length when quantizing"
    )
    p.add_argument("--workdir", default="/tmp/tsq-serve-bench", help="checkpoints and server logs")
    p.add_argument(
        "--output", default=str(RESULTS / "serve.md"), help="markdown report (PNG beside it)"
    )
    p.add_argument(
        "--engine-worker",
        nargs=2,
        metavar=("MODEL_DIR", "OUT_JSON"),
        help="internal: measure MODEL_DIR with vllm.LLM (no HTTP) and write the result to OUT_JSON",
    )
    p.add_argument("--quantization", help="internal, with --engine-worker: vLLM's --quantization")
    args = p.parse_args()
    if args.engine_worker:
        res = engine_only(
            args.engine_worker[0], args.quantization, args.streams, args.repeats, args.max_tokens
        )
        Path(args.engine_worker[1]).write_text(json.dumps(res))
        return 0

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    given = {}
    for c in args.checkpoint:
        bits, _, d = c.partition("=")
        if bits not in ("2", "3", "4") or not (Path(d) / "config.json").exists():
            raise SystemExit(
                f"--checkpoint {c!r}: expected BITS=DIR with BITS 2, 3 or 4 and DIR a tsq "
                "checkpoint directory with a config.json; pass e.g. --checkpoint "
                "3=/path/to/tsq-int3"
            )
        given[int(bits)] = d
    calib = {"dataset": "wiki", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}
    hf, ckpts, commands = prepare(work, given, calib)
    models = [
        (
            "bf16",
            hf,
            None,
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.launchers.api_server.entry",
                "--model",
                str(hf),
            ],
        )
    ]
    models += [
        (
            f"tsq INT{b} g64",
            ckpts[b],
            "tsq",
            [sys.executable, "-m", "tsq_vllm.serve", str(ckpts[b])],
        )
        for b in (4, 3, 2)
    ]
    load_start = os.getloadavg()[0]
    rows = []
    for name, model_dir, quantization, cmd in models:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        log = work / name.replace(" ", "-")
        with ServerProcess([*cmd, *COMMON], log.with_suffix(".log"), env=env, cwd=ROOT) as server:
            res = measure(server, args.streams, args.repeats, args.max_tokens)
            mem = memory_mib(server.proc.pid)
        engine = _run_engine_worker(model_dir, quantization, args, log.with_suffix(".engine.log"))
        weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 2**20
        rows.append(
            {
                "name": name,
                "command": _shell(server.cmd),
                "startup_s": server.startup_s,
                "streams": res,
                "engine": engine,
                "weights_mib": weights,
                **mem,
            }
        )
        print(
            name,
            json.dumps({n: round(v["tok_s"], 1) for n, v in res.items()}),
            "engine only",
            json.dumps({n: round(v["tok_s"], 1) for n, v in engine.items()}),
            f"PSS {mem['pss_mib']:.0f} MiB",
            flush=True,
        )

    lines = _report(rows, args, commands, load_start)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    _plot(rows, args.streams, out.with_suffix(".png"))
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
