"""Peak memory and time of quantizing with layer streaming: flat in depth, and an 8B-shaped layer.

    python benchmarks/bench_memory.py run depth2      # one configuration per call (one job each)
    python benchmarks/bench_memory.py run depth8
    python benchmarks/bench_memory.py run depth32
    python benchmarks/bench_memory.py run l3-8b-gptq  # one Llama-3-8B-shaped layer, plain GPTQ
    python benchmarks/bench_memory.py run l3-8b-tsq   # the same layer, both stages (the default)
    python benchmarks/bench_memory.py report          # rewrite the markdown from the results

Each configuration builds (once, cached under --workdir) a random-weight Llama written as bf16
safetensors shards with a small trained tokenizer, then runs `python -m tsq_vllm.quantize` on it
in a child process and records the child's peak RSS (`wait4`'s ru_maxrss), its own timing line,
and the model's size on disk. Rows append to benchmarks/results/bench_memory.jsonl; the report
is benchmarks/results/bench_memory.md.
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

_DEPTH = dict(hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab_size=32000)
_L3_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab_size=1024, layers=1)
CONFIGS = {
    "depth2": ({**_DEPTH, "layers": 2}, []),
    "depth8": ({**_DEPTH, "layers": 8}, []),
    "depth32": ({**_DEPTH, "layers": 32}, []),
    "l3-8b-gptq": (_L3_8B, ["--no-stage1", "--no-stage2", "--gptaq-alpha", "0"]),
    "l3-8b-tsq": (_L3_8B, []),
}
CALIB = ["--nsamples", "16", "--seqlen", "256", "--bits", "3", "--group-size", "64"]


def build(path: Path, shape: dict[str, int]) -> Path:
    """A random bf16 Llama of `shape` saved as safetensors shards, with tokenizer and text."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(ROOT))
    from tests.helpers import corpus, make_tokenizer

    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.ndim == 2 else p.fill_(1.0)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="500MB")
    make_tokenizer(384).save_pretrained(tmp)
    (tmp / "calib.txt").write_text("\n".join(corpus(2000, seed=1)))
    tmp.rename(path)
    return path


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run(name: str, workdir: Path, jsonl: Path) -> dict:
    shape, flags = CONFIGS[name]
    tag = "l3-8b" if name.startswith("l3-8b") else name
    src = build(workdir / f"src-{tag}", shape)
    out = workdir / f"out-{name}"
    cmd = [sys.executable, "-m", "tsq_vllm.quantize", "--model", str(src), "--output", str(out)]
    cmd += ["--overwrite", "--calib", f"text:{src}/calib.txt", *CALIB, *flags]
    start = time.perf_counter()
    log = workdir / f"{name}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    lines = log.read_text().splitlines()
    summary = next((ln for ln in reversed(lines) if ln.startswith("wrote ")), "")
    if code != 0 or not summary:
        raise SystemExit(f"{name}: exit {code}; see {log}: {lines[-1] if lines else ''}")
    quantize_s = float(summary.split("quantize ")[1].split("s")[0])
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    row = {
        "config": name,
        "shape": shape,
        "flags": flags,
        "command": (env + " " if env else "")
        + shlex.join([c.replace(sys.executable, "python") for c in cmd]),
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "source_bytes": _size(src),
        "checkpoint_bytes": _size(out),
        "quantize_seconds": quantize_s,
        "wall_seconds": time.perf_counter() - start,
        "summary": summary,
        "machine": _machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    with jsonl.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _machine() -> str:
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), ""
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return (
        f"{model or platform.machine()} (ISA: {', '.join(isa) or '-'}), "
        f"{os.environ.get('OMP_NUM_THREADS', '?')} torch thread(s), torch {torch.__version__}"
    )


def report(jsonl: Path, output: Path) -> None:
    rows: dict[str, dict] = {}
    for line in jsonl.read_text().splitlines() if jsonl.exists() else []:
        row = json.loads(line)
        rows[row["config"]] = row  # the latest run of each configuration
    md = [
        "# Memory and time of quantizing with layer streaming",
        "",
        "`python benchmarks/bench_memory.py run <config>` per row (one lane-A job each: one core, "
        "one torch thread, on a machine shared with other jobs), then `... report`. Random-weight "
        "Llama models written as bf16 safetensors shards; INT3 g64, 16 x 256 calibration tokens. "
        "Peak RSS is the child process's ru_maxrss.",
        "",
        "## Peak RSS against depth (hidden 1024, intermediate 2816, 16 heads, 4 KV heads)",
        "",
        "| config | layers | model on disk (MiB) | peak RSS (MiB) | quantize (s) | command |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in ("depth2", "depth8", "depth32"):
        if name in rows:
            r = rows[name]
            md.append(
                f"| {name} | {r['shape']['layers']} | {r['source_bytes'] / 2**20:.0f} | "
                f"{r['peak_rss_mib']:.0f} | {r['quantize_seconds']:.0f} | `{r['command']}` |"
            )
    depth = [rows[n] for n in ("depth2", "depth8", "depth32") if n in rows]
    if len(depth) > 1:
        rss = [r["peak_rss_mib"] for r in depth]
        md += [
            "",
            f"Peak RSS spread over depth: {min(rss):.0f}-{max(rss):.0f} MiB "
            f"({(max(rss) / min(rss) - 1):.1%} above the smallest; goal: within 10 %).",
        ]
    md += [
        "",
        "## One Llama-3-8B-shaped decoder layer (hidden 4096, intermediate 14336, 32 heads, 8 KV)",
        "",
        "| config | flags | peak RSS (MiB) | time per layer (s) | x 32 layers (h) | command |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name in ("l3-8b-gptq", "l3-8b-tsq"):
        if name in rows:
            r = rows[name]
            md.append(
                f"| {name} | `{' '.join(r['flags']) or '(defaults)'}` | {r['peak_rss_mib']:.0f} | "
                f"{r['quantize_seconds']:.0f} | {r['quantize_seconds'] * 32 / 3600:.2f} | "
                f"`{r['command']}` |"
            )
    machines = sorted({r["machine"] for r in rows.values()})
    md += ["", *(f"Machine: {m}." for m in machines), ""]
    output.write_text("\n".join(md))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("run", "report"))
    p.add_argument("config", nargs="?", choices=sorted(CONFIGS))
    p.add_argument("--workdir", default="/tmp/tsq-bench-memory")
    p.add_argument("--results", default=str(RESULTS / "bench_memory.jsonl"))
    p.add_argument("--output", default=str(RESULTS / "bench_memory.md"))
    args = p.parse_args()
    jsonl = Path(args.results)
    if args.action == "run":
        if not args.config:
            p.error("run needs a config")
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        row = run(args.config, Path(args.workdir), jsonl)
        print(json.dumps({k: row[k] for k in ("config", "peak_rss_mib", "quantize_seconds")}))
    report(jsonl, Path(args.output))


if __name__ == "__main__":
    main()
