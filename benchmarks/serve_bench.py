"""Serving throughput in vLLM (CPU): bf16 vs tsq INT4 / INT3 / INT2, side by side, and llama.cpp.

    python benchmarks/serve_bench.py                          # SmolLM2-135M; quantizes what it
                                                              # needs, ~15 min
    python benchmarks/serve_bench.py --checkpoint 3=DIR ...   # reuse existing tsq checkpoints
    python benchmarks/serve_bench.py --bits 4 --lm-head --streams 1 16   # INT4 with and without
                                                              # a quantized lm_head, vs bf16
    python benchmarks/serve_bench.py --bits 3 gptqt3          # tsq INT3 and GPTQT 3-bit (BCQ)
    python benchmarks/serve_bench.py --model Q.gguf --rtn --llamacpp Q4_K_M Q3_K_M Q2_K \
        --output benchmarks/results/serve_qwen.md             # another model, with llama.cpp

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
With --llamacpp, the same model's GGUF at those k-quant types is served by llama.cpp's own
server and measured by the same client (serve_llamacpp.py), its engine-only figure from
`llama-batched-bench`. --rtn quantizes the tsq checkpoints by rounding to nearest instead (same
packed format, same kernels, minutes instead of hours for a 1.5B model): for speed rows only.
Writes --output (markdown), and .png and .json beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import serve_llamacpp  # benchmarks/ is on sys.path as the script's directory
from serve_client import measure, memory_mib
from transformers import AutoTokenizer

from tsq_vllm.models import resolve_source
from tsq_vllm.serve.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
COMMON = ["--host", "127.0.0.1", "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "512"]
PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
    "Within a few decades printing spread across Europe, and"
)


def load_rows(path: Path) -> list[dict]:
    """The rows a run saved (WORKDIR/rows.json), with the stream counts as ints again."""
    rows = json.loads(path.read_text())
    for r in rows:
        r["streams"] = {int(n): v for n, v in r["streams"].items()}
        r["engine"] = {int(n): v for n, v in r["engine"].items()}
    return rows


def resolve_gguf(model: str) -> Path:
    """The GGUF file behind --model (a .gguf path, or 'smollm2' for the embedded one)."""
    src = resolve_source(model)
    if src.gguf_file is None:
        raise SystemExit(f"--llamacpp needs a GGUF model; --model {model!r} is not one")
    return Path(src.path) / src.gguf_file


def _shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")


def _recorded(ckpt: Path) -> tuple[dict | None, bool, bool, str] | None:
    """(calibration, quantized lm_head, round to nearest, method) as a checkpoint's
    quantize_config.json records them; None when there is no checkpoint there."""
    cfg = ckpt / "quantize_config.json"
    if not cfg.exists():
        return None
    c = json.loads(cfg.read_text())
    tsq = c.get("tsq", {})
    method = tsq.get("method", "tsq")
    return tsq.get("calibration"), bool(c.get("lm_head")), tsq.get("gptq") is False, method


# Checkpoint keys: "4", "4-lm-head" (tsq at 4 bits, with a quantized lm_head), "gptqt3" (GPTQT's
# 3-bit binary coding from its default 4-bit first pass, stored as BCQ). A suffix serves the same
# checkpoint with part of the native CPU kernel off, an A/B row: "-aten" all of it
# (TSQ_CPU_NATIVE=0), "-avx512" its AMX tile path (TSQ_CPU_AMX=0); "-int8" turns on its opt-in
# int8-activation path (TSQ_CPU_INT8=1), which changes the numerics.
KEY = re.compile(r"(gptqt[23]|[234](-lm-head)?)(-aten|-avx512|-int8)?")
ATEN = "-aten"
AB_ROWS = {  # suffix: (environment, what the row name adds)
    ATEN: ({"TSQ_CPU_NATIVE": "0"}, " (aten int4 kernel)"),
    "-avx512": ({"TSQ_CPU_AMX": "0"}, " (native kernel, AMX off)"),
    "-int8": ({"TSQ_CPU_INT8": "1"}, " (native kernel, int8 activations)"),
}


def _base(key: str) -> str:
    """The checkpoint key without its A/B suffix."""
    return next((key.removesuffix(s) for s in AB_ROWS if key.endswith(s)), key)


def _ab(key: str) -> tuple[dict[str, str], str]:
    return next((v for s, v in AB_ROWS.items() if key.endswith(s)), ({}, ""))


def _variant(key: str) -> tuple[str, int, bool]:
    """(method, bits, quantized lm_head) of a checkpoint key."""
    key = _base(key)
    if key.startswith("gptqt"):
        return "gptqt", int(key.removeprefix("gptqt")), False
    bits, _, head = key.partition("-")
    return "tsq", int(bits), bool(head)


def _row_name(key: str) -> str:
    method, bits, head = _variant(key)
    kernel = _ab(key)[1]
    if method == "gptqt":
        return f"tsq GPTQT {bits}-bit g64 (BCQ){kernel}"
    return f"tsq INT{bits} g64{' + lm_head' if head else ''}{kernel}"


# What quantizes a speed-only checkpoint (--rtn): round to nearest, no stage, no FP stream.
RTN_FLAGS = ["--no-gptq", "--no-stage1", "--no-stage2", "--gptaq-alpha", "0", "--no-error-feedback"]


def prepare(
    work: Path, given: dict[str, str], calib: dict, keys: list[str], model: str, rtn: bool
) -> tuple[Path, dict[str, Path], list[str]]:
    """The bf16 baseline's HF directory and a tsq checkpoint per key ("4", "4-lm-head", ...);
    the commands that made them.

    A checkpoint already in `work` is reused only if its quantize_config.json records the same
    calibration as `calib` (the `calibration` record's fields) and the same lm_head setting; the
    report lists its command either way.
    """
    import torch
    from accuracy import export_hf_model  # benchmarks/ is on sys.path as the script's directory

    commands = []
    hf = work / ("smollm2-hf" if model == "smollm2" else "model-hf")
    export_hf_model(hf, torch.bfloat16, model)
    flags = [
        *(RTN_FLAGS if rtn else []),
        "--calib",
        calib["dataset"],
        *(a for k in ("nsamples", "seqlen", "seed") for a in (f"--{k}", str(calib[k]))),
    ]
    ckpts = {}
    for key in dict.fromkeys(_base(k) for k in keys):  # "3-aten" serves "3"'s
        method, bits, head = _variant(key)
        d = given.get(key) or next((given[key + s] for s in AB_ROWS if key + s in given), None)
        if d:
            ckpts[key] = Path(d)
            commands.append(f"# {_row_name(key)}: given checkpoint {d}")
            continue
        stem = f"gptqt-int{bits}-g64" if method == "gptqt" else f"tsq-int{bits}-g64"
        ckpts[key] = work / (stem + ("-lm-head" if head else ""))
        cmd = [
            sys.executable,
            "-m",
            "tsq_vllm.quantize",
            "--model",
            model,
            "--bits",
            str(bits),
            "--group-size",
            "64",
            *(["--method", "gptqt"] if method == "gptqt" else []),
            *flags,
            *(["--quantize-lm-head"] if head else []),
            "--output",
            str(ckpts[key]),
            "--overwrite",
        ]
        commands.append(_shell(cmd))
        if _recorded(ckpts[key]) != (calib, head, rtn, method):
            subprocess.run(
                cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
    for key in keys:
        ckpts[key] = ckpts[_base(key)]
    return hf, ckpts, commands


def backends_in_log(log: Path) -> list[str]:
    """The kernel backends the tsq linear method chose, from a server log (`kernels.backends`)."""
    found = re.findall(r"using (\S+) backend", log.read_text(errors="replace"))
    return sorted(set(found))


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
    model_dir: Path,
    quantization: str | None,
    args: argparse.Namespace,
    log: Path,
    extra_env: dict[str, str],
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
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **extra_env}
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    return {int(n): v for n, v in json.loads(result.read_text()).items()}


def main() -> int:
    from serve_report import write_report  # benchmarks/ is on sys.path as the script's directory

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
        help="use this tsq checkpoint for BITS instead of quantizing one (BITS-lm-head=DIR: "
        "the --lm-head variant)",
    )
    p.add_argument(
        "--bits",
        nargs="+",
        default=["4", "3", "2"],
        help="tsq bit widths to serve; BITS-lm-head for a quantized lm_head at that width only; "
        "gptqt3 / gptqt2 for GPTQT's binary coding (--method gptqt, b0 = 4, stored as BCQ)",
    )
    p.add_argument(
        "--lm-head",
        action="store_true",
        help="also serve each bit width with a quantized lm_head (--quantize-lm-head)",
    )
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows when quantizing")
    p.add_argument(
        "--seqlen", type=int, default=256, help="calibration window length when quantizing"
    )
    p.add_argument(
        "--model",
        default="smollm2",
        help="the model as `tsq_vllm.quantize --model` takes it (a .gguf for --llamacpp)",
    )
    p.add_argument("--label", help="the model's name in the report (default: from --model)")
    p.add_argument(
        "--rtn",
        action="store_true",
        help="quantize the tsq checkpoints by round to nearest (speed rows only; same format)",
    )
    p.add_argument(
        "--llamacpp",
        nargs="+",
        default=[],
        metavar="KQUANT",
        help="also serve the GGUF with llama.cpp at these k-quant types, e.g. Q4_K_M Q3_K_M",
    )
    p.add_argument(
        "--llamacpp-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="llama.cpp threads (default: one per CPU, what a user would pass)",
    )
    p.add_argument(
        "--llamacpp-args",
        default="",
        metavar="ARGS",
        help="more llama-server / llama-batched-bench flags, e.g. '--no-repack' where llama.cpp's "
        "repacked (AMX) matmul crashes at startup, as its 0.3.36 source does on AMX hosts",
    )
    p.add_argument(
        "--goal",
        nargs="+",
        default=["1=1.5", "16=1.0"],
        metavar="N=X",
        help="report whether tsq reaches X× bf16 tokens/s at N streams",
    )
    p.add_argument(
        "--report-from",
        metavar="ROWS_JSON",
        help="write the report from a run's saved rows (WORKDIR/rows.json) instead of measuring",
    )
    p.add_argument(
        "--reuse-rows",
        metavar="ROWS_JSON",
        help="take the rows of models already measured there (same name) instead of measuring "
        "them again, e.g. to finish an interrupted run",
    )
    p.add_argument(
        "--skip-engine", action="store_true", help="skip the engine-only (no HTTP) measurements"
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

    if args.report_from:
        rows = load_rows(Path(args.report_from))
        commands = [f"# rows from {args.report_from}"]
        write_report(rows, args, commands, os.getloadavg()[0], PROMPT)
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    bad = [b for b in args.bits if not KEY.fullmatch(b)]
    if bad:
        raise SystemExit(
            f"--bits {' '.join(bad)}: expected 2, 3 or 4, e.g. 3-lm-head, or gptqt3 / gptqt2, "
            "each optionally with -aten (the native CPU kernel off)"
        )
    keys = [
        f"{b}{sfx}"
        for b in args.bits
        for sfx in ("", "-lm-head")[: 1 + (args.lm_head and len(b) == 1)]
    ]
    keys = list(dict.fromkeys(keys))  # e.g. 3-lm-head both given and implied by --lm-head
    if args.rtn and any(k.startswith("gptqt") for k in keys):
        raise SystemExit("--rtn makes round-to-nearest tsq checkpoints; drop it for gptqt2/gptqt3")
    given = {}
    for c in args.checkpoint:
        key, _, d = c.partition("=")
        if not KEY.fullmatch(key) or not (Path(d) / "config.json").exists():
            raise SystemExit(
                f"--checkpoint {c!r}: expected KEY=DIR with KEY one of --bits' values (2, 3, 4, "
                "3-lm-head, gptqt3, ...) and DIR a tsq checkpoint directory with a config.json; "
                "pass e.g. --checkpoint 3=/path/to/tsq-int3"
            )
        given[key] = d
    calib = {"dataset": "wiki", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}
    hf, ckpts, commands = prepare(work, given, calib, keys, args.model, args.rtn)
    bf16_cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model"]
    models = [{"name": "bf16", "dir": hf, "quantization": None, "cmd": [*bf16_cmd, str(hf)]}]
    for k in keys:
        _, bits, _ = _variant(k)
        models.append(
            {
                "name": _row_name(k),
                "dir": ckpts[k],
                "quantization": "tsq",
                "cmd": [sys.executable, "-m", "tsq_vllm.serve", str(ckpts[k])],
                "bits": bits,
                "env": _ab(k)[0],
            }
        )
    if args.llamacpp:
        llama_extra = shlex.split(args.llamacpp_args)
        ggufs, made = serve_llamacpp.kquant_ggufs(resolve_gguf(args.model), work, args.llamacpp)
        commands += made
        ctx = int(COMMON[COMMON.index("--max-model-len") + 1])
        models += [
            {
                "name": f"llama.cpp {kq}"
                + (
                    ""
                    if args.llamacpp_threads == os.cpu_count()
                    else f" ({args.llamacpp_threads} thr)"
                ),
                "gguf": g,
                "cmd": serve_llamacpp.server_command(
                    g, max(args.streams), ctx, args.llamacpp_threads, llama_extra
                ),
                "bits": serve_llamacpp.bits_of(kq),
            }
            for kq, g in ggufs.items()
        ]
    prompt_tokens = len(AutoTokenizer.from_pretrained(hf)(PROMPT)["input_ids"])
    load_start = os.getloadavg()[0]
    rows = []
    done = {r["name"]: r for r in (load_rows(Path(args.reuse_rows)) if args.reuse_rows else [])}
    for m in models:
        if m["name"] in done:  # measured by an earlier run (--reuse-rows)
            rows.append(done[m["name"]])
            continue
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **m.get("env", {})}
        log = work / re.sub(r"[ ()]", "-", m["name"])
        with ServerProcess(
            [*m["cmd"], *([] if "gguf" in m else COMMON)],
            log.with_suffix(".log"),
            env=env,
            cwd=ROOT,
        ) as server:
            res = measure(server, args.streams, args.repeats, args.max_tokens, PROMPT)
            mem = memory_mib(server.proc.pid)
        if args.skip_engine:
            engine = {}
        elif "gguf" in m:
            engine = serve_llamacpp.engine_only(
                m["gguf"],
                args.streams,
                args.repeats,
                prompt_tokens,
                args.max_tokens,
                args.llamacpp_threads,
                llama_extra,
            )
        else:
            engine = _run_engine_worker(
                m["dir"], m["quantization"], args, log.with_suffix(".engine.log"), m["env"]
            )
        files = [m["gguf"]] if "gguf" in m else list(Path(m["dir"]).glob("*.safetensors"))
        rows.append(
            {
                "name": m["name"],
                "bits": m.get("bits"),
                "command": " ".join(f"{k}={v}" for k, v in m.get("env", {}).items())
                + (" " if m.get("env") else "")
                + _shell(server.cmd),
                "startup_s": server.startup_s,
                "streams": res,
                "engine": engine,
                "weights_mib": sum(f.stat().st_size for f in files) / 2**20,
                "backends": backends_in_log(log.with_suffix(".log")) if "dir" in m else [],
                **mem,
            }
        )
        # Kept after every model, so a failure later loses nothing (--report-from rebuilds).
        (work / "rows.json").write_text(json.dumps(rows, indent=1))
        print(
            m["name"],
            json.dumps({n: round(v["tok_s"], 1) for n, v in res.items()}),
            "engine only",
            json.dumps({n: round(v["tok_s"], 1) for n, v in engine.items()}),
            f"PSS {mem['pss_mib']:.0f} MiB",
            flush=True,
        )

    write_report(rows, args, commands, load_start, PROMPT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
