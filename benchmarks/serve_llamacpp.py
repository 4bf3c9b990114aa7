"""llama.cpp as serve_bench.py's CPU yardstick: k-quant GGUFs, its OpenAI server, its batched bench.

The binaries come from `benchmarks/setup_llamacpp.sh` (benchmarks/.llamacpp/bin). What a user
would run instead of vLLM on a CPU: `llama-server` with one slot per concurrent stream
(continuous batching is its default) and one thread per core, serving the same completions API,
so serve_bench.py's client measures both the same way. `llama-batched-bench` is the counterpart
of serve_bench's engine-only table: the same decode without the HTTP front end.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

__all__ = ["BIN", "bits_of", "engine_only", "kquant_ggufs", "server_command"]

BIN = Path(__file__).resolve().parent / ".llamacpp/bin"
# Nominal bits of the k-quant mixes serve_bench compares with tsq INT4 / INT3 / INT2.
BITS = {"Q4_K_M": 4, "Q4_K_S": 4, "Q3_K_M": 3, "Q3_K_S": 3, "Q3_K_L": 3, "Q2_K": 2}


def _binary(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `bash benchmarks/setup_llamacpp.sh` first")
    return path


def bits_of(kquant: str) -> int:
    if kquant not in BITS:
        raise SystemExit(f"--llamacpp {kquant!r}: expected one of {', '.join(BITS)}")
    return BITS[kquant]


def kquant_ggufs(source: Path, work: Path, kquants: list[str]) -> tuple[dict[str, Path], list[str]]:
    """A GGUF per k-quant type, and the commands that made them.

    The source itself serves for the type its file name carries (Q4_K_M for the Qwen GGUF); the
    others are requantized from it with `llama-quantize --allow-requantize`: the weights pass
    through the source's 4-bit grid first, which costs accuracy, not speed, and speed is what
    these files are for.
    """
    out, commands = {}, []
    for kq in kquants:
        bits_of(kq)
        if kq.lower() in source.name.lower():
            out[kq] = source
            commands.append(f"# llama.cpp {kq}: {source}")
            continue
        out[kq] = work / f"{source.stem.split('-q')[0]}-{kq}.gguf"
        cmd = [str(_binary("llama-quantize")), "--allow-requantize", str(source), str(out[kq]), kq]
        commands.append(" ".join(cmd).replace(str(BIN) + "/", ""))
        if not out[kq].exists():
            tmp = out[kq].with_suffix(".partial")
            subprocess.run([*cmd[:3], str(tmp), kq], check=True, capture_output=True)
            tmp.rename(out[kq])
    return out, commands


def server_command(
    gguf: Path, slots: int, ctx_per_slot: int, threads: int, extra: list[str]
) -> list[str]:
    """llama-server on `gguf`: `slots` parallel sequences of `ctx_per_slot` tokens each,
    `threads` threads for prompt and decode, then `extra` (serve_bench's --llamacpp-args);
    ServerProcess appends --port."""
    return [
        str(_binary("llama-server")),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "-c",
        str(slots * ctx_per_slot),
        "-np",
        str(slots),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--no-webui",
        *extra,
    ]


def engine_only(
    gguf: Path,
    streams: list[int],
    repeats: int,
    prompt_tokens: int,
    max_tokens: int,
    threads: int,
    extra: list[str],
) -> dict[int, dict]:
    """Output tok/s of llama.cpp's decode without its server: `llama-batched-bench` with n
    parallel sequences of `prompt_tokens` prompt tokens and `max_tokens` new tokens each;
    output tokens / (prompt + generation time), as serve_bench's engine-only figure counts."""
    cmd = [
        str(_binary("llama-batched-bench")),
        "-m",
        str(gguf),
        "-c",
        str(max(streams) * (prompt_tokens + max_tokens)),
        "-npp",
        str(prompt_tokens),
        "-ntg",
        str(max_tokens),
        "-npl",
        ",".join(map(str, streams)),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--output-format",
        "jsonl",
        *extra,
    ]
    rounds: dict[int, list[float]] = {n: [] for n in streams}
    for _ in range(repeats):
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        for line in (res.stdout + res.stderr).splitlines():
            if line.startswith("{") and '"pl"' in line:
                row = json.loads(line)
                rounds[row["pl"]].append(row["pl"] * row["tg"] / row["t"])
    missing = [n for n, r in rounds.items() if len(r) != repeats]
    if missing:
        raise SystemExit(f"llama-batched-bench gave no result for {missing} sequences: {cmd}")
    return {n: {"tok_s": statistics.median(r), "tok_s_rounds": r} for n, r in rounds.items()}
