"""vLLM's built-in `gptq` method on a 4-bit symmetric tsq checkpoint of SmolLM2: same greedy tokens?

    python -m tsq_vllm.quantize --model smollm2 --bits 4 --sym --group-size 64 --calib wiki \
        --nsamples 32 --seqlen 256 --seed 0 --output /tmp/tsq-compat/int4-g64-sym
    python benchmarks/vllm_gptq_check.py /tmp/tsq-compat/int4-g64-sym

Copies the checkpoint with `quant_method: "gptq"` (nothing else changes), serves the copy with
vLLM's offline `LLM(quantization="gptq", dtype="float16")` (its GPTQ path takes fp16/bf16 only;
on CPU it runs vLLM's WNA16 kernel, in its AVX-512 build) and compares its greedy continuations
with transformers in fp32 on the checkpoint's dequantized weights (`tsq_vllm.load_quantized`).
Where the two part, it records the reference's logit margin between its top two tokens there: a
near-tie that fp16 rounding can flip, or a real difference. Writes
benchmarks/results/vllm_gptq_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
PROMPTS = [
    "The history of the city begins in",
    "In mathematics, a prime number is",
    "The river flows through the valley and",
    "During the war, the army",
]
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def as_gptq(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((dst / name).read_text())
        (cfg["quantization_config"] if name == "config.json" else cfg)["quant_method"] = "gptq"
        (dst / name).write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def vllm_greedy(ckpt: Path, prompts: list[list[int]], n_new: int) -> tuple[list[list[int]], str]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(ckpt),
        quantization="gptq",
        dtype="float16",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=8,
        seed=0,
        distributed_executor_backend="uni",
    )
    params = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], str(
        llm.llm_engine.vllm_config.model_config.quantization
    )


def reference(ckpt: Path, prompts: list[list[int]], served: list[list[int]], n_new: int) -> list:
    """Per prompt: fp32 greedy tokens on the dequantized weights, and where vLLM's part from them
    the reference's top-2 logit margin at that step (teacher-forced on the common prefix)."""
    import torch

    from tsq_vllm.checkpoint.hf import load_quantized

    model = load_quantized(ckpt).eval()
    rows = []
    with torch.no_grad():
        for prompt, got in zip(prompts, served, strict=True):
            ids = torch.tensor([prompt])
            ref: list[int] = []
            margin = None
            for _ in range(n_new):
                logits = model(input_ids=ids).logits[0, -1]
                top2 = logits.topk(2)
                nxt = int(top2.indices[0])
                if margin is None and len(ref) < len(got) and got[len(ref)] != nxt:
                    margin = float(top2.values[0] - logits[got[len(ref)]])
                ref.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            same = next((i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), None)
            rows.append({"reference": ref, "vllm": got, "first_diff": same, "margin": margin})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a 4-bit --sym tsq checkpoint directory")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--workdir", default="/tmp/tsq-compat", help="where the gptq copy goes")
    args = p.parse_args()
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    import torch
    from transformers import AutoTokenizer

    src = Path(args.checkpoint)
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    if qc["bits"] != 4 or not qc["sym"]:
        raise SystemExit(
            f"{src}: bits={qc['bits']} sym={qc['sym']}; vLLM's gptq serves 4-bit symmetric: "
            "quantize with --bits 4 --sym"
        )
    if not torch.cpu._is_avx512_supported():
        print("skipped: vLLM's CPU GPTQ path (its WNA16 kernel) needs an AVX-512 host")
        return 0
    ck = as_gptq(src, Path(args.workdir) / f"{src.name}-gptq")
    tok = AutoTokenizer.from_pretrained(src)
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    t = time.perf_counter()
    served, method = vllm_greedy(ck, prompts, args.new_tokens)
    vllm_s = time.perf_counter() - t
    rows = reference(src, prompts, served, args.new_tokens)
    result = {
        "checkpoint": str(src),
        "bits": qc["bits"],
        "group_size": qc["group_size"],
        "sym": qc["sym"],
        "vllm_quantization": method,
        "vllm_dtype": "float16",
        "vllm_seconds": vllm_s,
        "new_tokens": args.new_tokens,
        "prompts": [{"text": t, **r} for t, r in zip(PROMPTS, rows, strict=True)],
        "omp_threads": os.environ.get("OMP_NUM_THREADS", ""),
    }
    (RESULTS / "vllm_gptq_check.json").write_text(json.dumps(result, indent=1) + "\n")
    same = sum(r["first_diff"] is None for r in rows)
    lines = [
        "# vLLM's built-in `gptq` on a tsq checkpoint (SmolLM2-135M, 4-bit sym g"
        f"{qc['group_size']})",
        "",
        "Generated by `python benchmarks/vllm_gptq_check.py CKPT`: the checkpoint relabelled "
        '`quant_method: "gptq"`, served by `vllm.LLM(quantization="gptq", dtype="float16")` '
        f"(resolved method: `{method}`), against transformers fp32 on the dequantized weights; "
        f"{args.new_tokens} greedy tokens per prompt. One torch thread, shared machine.",
        "",
        f"**{same} of {len(rows)} prompts give identical greedy tokens.**",
        "",
        "| prompt | identical | first difference at | reference top-2 margin there |",
        "|---|---|---|---|",
    ]
    for t, r in zip(PROMPTS, rows, strict=True):
        diff = "" if r["first_diff"] is None else str(r["first_diff"])
        margin = "" if r["margin"] is None else f"{r['margin']:.3f}"
        same_s = "yes" if r["first_diff"] is None else "no"
        lines.append(f"| {t} | {same_s} | {diff} | {margin} |")
    (RESULTS / "vllm_gptq_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
