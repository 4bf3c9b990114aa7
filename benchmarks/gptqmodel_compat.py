"""Do tsq checkpoints load in GPTQModel and give the same perplexity? (the GPTQ-compatibility claim)

    python benchmarks/gptqmodel_compat.py \
        /tmp/tsq-accuracy/int3-g64-default /tmp/tsq-accuracy/int2-g64-default

For each tsq checkpoint it (1) measures its perplexity with `tsq_vllm.eval` (our loader), (2) makes
a copy that declares itself a plain GPTQ checkpoint and (3) loads that copy with GPTQModel 7.7's
own loader (`GPTQModel.load`, in benchmarks/.venv-gptqmodel: `bash benchmarks/setup_gptqmodel.sh`)
and computes perplexity on the very same token windows (exported to safetensors) with the same
formula. The copy changes two things in `config.json["quantization_config"]` and
`quantize_config.json`, nothing in the tensors:
  - `quant_method`: "tsq" -> "gptq";
  - `meta.quantizer`: ["gptqmodel:0.9.0"]. GPTQModel refuses an asymmetric GPTQ-v1 checkpoint
    unless this names GPTQModel >= 0.9.0, because old AutoGPTQ v1 files stored asymmetric zero
    points off by one; tsq's v1 stores z - 1 exactly as GPTQModel >= 0.9.0 does, so the
    declaration is true of the tensors (a symmetric checkpoint needs no meta at all).
GPTQModel picks its CPU kernel and dtype itself: its CPU kernel (TorchLinear) refuses fp32 and
runs bf16, so the two perplexities differ by activation precision as well as by loader (ours
evaluates in fp32). Results go to benchmarks/results/gptqmodel_compat.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
GPTQMODEL_PY = ROOT / "benchmarks/.venv-gptqmodel/bin/python"
QUANTIZER_META = {"quantizer": ["gptqmodel:0.9.0"]}
TOLERANCE = 0.01


def _ppl(forward, windows, batch_size: int = 4) -> dict:
    """exp(mean next-token NLL) over windows [n, L]: the formula of `tsq_vllm.eval.perplexity`."""
    import math

    import torch

    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for b0 in range(0, windows.shape[0], batch_size):
            ids = windows[b0 : b0 + batch_size]
            logits = forward(ids)
            for row, target in zip(logits, ids, strict=True):
                nll_sum += float(
                    torch.nn.functional.cross_entropy(row[:-1].float(), target[1:], reduction="sum")
                )
                count += target.numel() - 1
    return {"nll": nll_sum / count, "ppl": math.exp(nll_sum / count), "tokens": count}


def gptqmodel_worker(checkpoint: str, windows_file: str, out_json: str) -> int:
    """In GPTQModel's venv: load `checkpoint` with GPTQModel and measure perplexity."""
    import torch
    from gptqmodel import GPTQModel
    from safetensors.torch import load_file

    windows = load_file(windows_file)["input_ids"]
    t = time.perf_counter()
    model = GPTQModel.load(checkpoint, device="cpu")
    load_s = time.perf_counter() - t
    kernels = sorted({type(m).__name__ for m in model.model.modules() if hasattr(m, "qweight")})
    t = time.perf_counter()
    res = _ppl(lambda ids: model.model(input_ids=ids, use_cache=False).logits, windows)
    import gptqmodel

    res.update(
        load_seconds=load_s,
        eval_seconds=time.perf_counter() - t,
        kernels=kernels,
        dtype=str(next(model.model.parameters()).dtype),
        gptqmodel=gptqmodel.__version__,
        torch=torch.__version__,
    )
    Path(out_json).write_text(json.dumps(res, indent=1))
    return 0


def gptq_copy(src: Path, dst: Path) -> None:
    """A copy of tsq checkpoint `src` that declares itself a GPTQ checkpoint (see the docstring)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for name in ("config.json", "quantize_config.json"):
        path = dst / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        qc = data["quantization_config"] if name == "config.json" else data
        qc["quant_method"] = "gptq"
        if not qc.get("sym", False):
            qc["meta"] = QUANTIZER_META
        path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*", help="tsq checkpoint directories")
    p.add_argument(
        "--eval-tokens", type=int, default=8192, help="wiki test tokens (as accuracy.py)"
    )
    p.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--workdir", default="/tmp/tsq-compat", help="copies, windows and logs")
    p.add_argument("--worker", nargs=3, metavar=("CKPT", "WINDOWS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return gptqmodel_worker(*args.worker)
    if not args.checkpoints:
        p.error("name at least one tsq checkpoint directory")
    if not GPTQMODEL_PY.exists():
        raise SystemExit(f"{GPTQMODEL_PY} not found: run bash benchmarks/setup_gptqmodel.sh first")

    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from tsq_vllm.data import contiguous_windows, load_documents, tokenize_documents
    from tsq_vllm.eval import evaluate

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for ckpt in map(Path, args.checkpoints):
        ours = evaluate(str(ckpt), seqlen=args.eval_seqlen, max_tokens=args.eval_tokens)
        tok = AutoTokenizer.from_pretrained(ckpt)
        windows = contiguous_windows(
            tokenize_documents(tok, load_documents("wiki", split="test")),
            args.eval_seqlen,
            args.eval_tokens,
        )
        wfile = work / f"{ckpt.name}.windows.safetensors"
        save_file({"input_ids": windows.contiguous()}, str(wfile))
        copy = work / f"{ckpt.name}-gptq"
        gptq_copy(ckpt, copy)
        out = work / f"{ckpt.name}.gptqmodel.json"
        cmd = [str(GPTQMODEL_PY), __file__, "--worker", str(copy), str(wfile), str(out)]
        with (work / f"{ckpt.name}.gptqmodel.log").open("w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work).returncode
        if rc:
            raise SystemExit(f"GPTQModel failed on {copy} (exit {rc}); see {log.name}")
        theirs = json.loads(out.read_text())
        qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        rel = abs(theirs["ppl"] - ours["ppl"]) / ours["ppl"]
        rows.append(
            {
                "checkpoint": str(ckpt),
                "bits": qc["bits"],
                "group_size": qc["group_size"],
                "sym": qc["sym"],
                "checkpoint_format": qc["checkpoint_format"],
                "tokens": ours["tokens"],
                "same_tokens": ours["tokens"] == theirs["tokens"],
                "ppl_tsq": ours["ppl"],
                "ppl_gptqmodel": theirs["ppl"],
                "rel_diff": rel,
                "within_tolerance": rel <= TOLERANCE,
                "gptqmodel": theirs,
                "omp_threads": os.environ.get("OMP_NUM_THREADS", ""),
            }
        )
        print(
            f"{ckpt}: tsq {ours['ppl']:.4f}, GPTQModel {theirs['ppl']:.4f} ({100 * rel:.3f} %)",
            flush=True,
        )
    write_report(rows)
    return 0 if all(r["within_tolerance"] for r in rows) else 1


def write_report(rows: list[dict]) -> None:
    (RESULTS / "gptqmodel_compat.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# tsq checkpoints in GPTQModel's loader",
        "",
        "Generated by `python benchmarks/gptqmodel_compat.py CKPT...` (GPTQModel in "
        "benchmarks/.venv-gptqmodel). Each tsq checkpoint is evaluated by `tsq_vllm.eval`, then a "
        'copy with `quant_method: "gptq"` and `meta.quantizer: ["gptqmodel:0.9.0"]` (GPTQModel '
        "refuses asymmetric GPTQ v1 without it; tsq's v1 zero points are stored as z − 1 exactly "
        "as GPTQModel ≥ 0.9.0 stores them) is loaded with `GPTQModel.load(dir, device='cpu')` and "
        "evaluated on the same token windows with the same formula. GPTQModel's CPU kernel "
        "refuses fp32, so it runs in its default bf16 while ours runs fp32: the difference "
        "includes activation precision. "
        f"Tolerance: {100 * TOLERANCE:.0f} % relative. One torch thread, shared machine.",
        "",
        "| checkpoint | bits | group | sym | format | tokens | tsq ppl | GPTQModel ppl | diff | "
        "GPTQModel kernel, dtype | within 1 % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{Path(r['checkpoint']).name}` | {r['bits']} | {r['group_size']} | {r['sym']} | "
            f"{r['checkpoint_format']} | {r['tokens']} | {r['ppl_tsq']:.4f} | "
            f"{r['ppl_gptqmodel']:.4f} | {100 * r['rel_diff']:.3f} % | "
            f"{', '.join(r['gptqmodel']['kernels'])}, {r['gptqmodel']['dtype']} | "
            f"{'yes' if r['within_tolerance'] else 'NO'} |"
        )
    versions = {(r["gptqmodel"]["gptqmodel"], r["gptqmodel"]["torch"]) for r in rows}
    lines += ["", "GPTQModel / torch: " + ", ".join(f"{g} / {t}" for g, t in versions), ""]
    (RESULTS / "gptqmodel_compat.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
