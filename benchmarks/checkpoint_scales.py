"""Negative scales per projection kind in GPTQ-format checkpoints, and the per-linear quality
that `python -m tsq_vllm.quantize` logged while writing them.

    python benchmarks/checkpoint_scales.py CKPT_DIR [CKPT_DIR ...] [--json OUT.json]

For each checkpoint: how many fp16 `scales` are < 0 (and = 0) per projection kind (q_proj, o_proj,
down_proj, ...), summed over layers. If `CKPT_DIR.quantize.log` (what benchmarks/accuracy.py writes
beside each checkpoint) holds the per-linear "rel error a -> b, output energy c -> d" lines, their
median per kind is reported too: rel error = E‖QX − WX̃‖² / E‖WX̃‖², energy = E‖QX‖² / E‖WX̃‖².
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

_LOG_LINE = re.compile(
    r"\.(\w+): rel error ([\d.e+-]+) -> ([\d.e+-]+), output energy ([\d.]+) -> ([\d.]+)"
)


def scale_signs(ckpt: Path) -> dict[str, dict[str, int]]:
    """{kind: {"negative", "zero", "total", "linears"}} over every `*.scales` tensor."""
    from safetensors import safe_open

    out: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(
        ("negative", "zero", "total", "linears"), 0))  # fmt: skip
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{ckpt}: no *.safetensors files: pass a checkpoint directory")
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if not key.endswith(".scales"):
                    continue
                s = st.get_tensor(key)
                c = out[key.split(".")[-2]]
                c["negative"] += int((s < 0).sum())
                c["zero"] += int((s == 0).sum())
                c["total"] += s.numel()
                c["linears"] += 1
    return dict(out)


def log_quality(log: Path) -> dict[str, dict[str, float]]:
    """Median rel error and output energy per kind, before and after stage 2, from the log."""
    per: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    if log.exists():
        for m in _LOG_LINE.finditer(log.read_text()):
            per[m.group(1)].append(tuple(float(x) for x in m.groups()[1:]))
    keys = ("rel_error_gptq", "rel_error", "energy_gptq", "energy")
    return {
        kind: {k: statistics.median(v[i] for v in vals) for i, k in enumerate(keys)}
        for kind, vals in per.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--json", type=Path, help="also write the counts as JSON here")
    args = p.parse_args(argv)
    result = {}
    for ckpt in args.checkpoints:
        signs = scale_signs(ckpt)
        quality = log_quality(ckpt.parent / f"{ckpt.name}.quantize.log")
        result[str(ckpt)] = {"scales": signs, "log_median": quality}
        neg = sum(c["negative"] for c in signs.values())
        print(f"{ckpt}: {neg} negative scales")
        for kind, c in signs.items():
            q = quality.get(kind)
            extra = (
                f"; median rel error {q['rel_error_gptq']:.4g} -> {q['rel_error']:.4g}, "
                f"energy {q['energy_gptq']:.3f} -> {q['energy']:.3f}"
                if q
                else ""
            )
            print(
                f"  {kind:>10}: {c['negative']} negative, {c['zero']} zero of {c['total']} "
                f"({c['linears']} linears){extra}"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
