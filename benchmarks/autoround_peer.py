"""One AutoRound quantization on given calibration windows: the AutoRound peer rows of accuracy.py.

    benchmarks/.venv-autoround/bin/python benchmarks/autoround_peer.py \
        --model /tmp/tsq-accuracy/smollm2-hf \
        --calib /tmp/tsq-accuracy/calib-32x256-seed0.safetensors \
        --bits 3 --group-size 64 --iters 50 --lr 5e-3 --output DIR --stats-json stats.json

Runs in AutoRound's own venv (benchmarks/setup_autoround.sh), never imports tsq_vllm. The model is
the fp32 HF export tsq's rows start from; the calibration windows are the exact token ids tsq used
(a safetensors file, input_ids [n, L]), passed to AutoRound as a list of [1, L] tensors, with
nsamples = n and seqlen = L so it neither drops nor re-samples any. Asymmetric by default (like
the tsq rows; `--sym` is AutoRound's own default scheme W{b}A16). Everything else is AutoRound's
default (SignRound, batch size 8, min-max tuning, quantized block inputs), except the iteration
count and, when given, the learning rate (AutoRound's own default is 1/iters; its "light" recipe
pairs 50 iterations with lr 5e-3). The result is exported in AutoRound's GPTQ format
(`auto_gptq`: GPTQ v1, which stores zero points minus one). Writes the quantize-and-save wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (fp32)")
    p.add_argument("--calib", required=True, help="safetensors file with input_ids [n, L]")
    p.add_argument("--bits", type=int, required=True, help="bits per weight")
    p.add_argument("--group-size", type=int, required=True, help="group size")
    p.add_argument("--iters", type=int, default=200, help="SignRound steps per block (its default)")
    p.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: AutoRound's 1/iters)"
    )
    p.add_argument("--sym", action="store_true", help="symmetric grid (AutoRound's default)")
    p.add_argument("--output", required=True, help="checkpoint directory")
    p.add_argument("--stats-json", required=True, help="where to write timings")
    args = p.parse_args()

    import auto_round
    import torch
    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(args.calib)["input_ids"]  # [n, L]
    n, seqlen = ids.shape
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    ar = AutoRound(
        model,
        tokenizer=tokenizer,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        dataset=[row.unsqueeze(0) for row in ids],
        nsamples=n,
        seqlen=seqlen,
        iters=args.iters,
        lr=args.lr,
        device_map="cpu",
        seed=0,
    )
    # AutoRound saves into a subdirectory named after the model and scheme: let it write into a
    # temporary sibling and move the checkpoint to --output, so --output is whole or absent.
    out = Path(args.output)
    tmp = out.with_name(out.name + ".autoround-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ar.quantize_and_save(output_dir=str(tmp), format="auto_gptq")
        quantize_s = time.perf_counter() - t
        (written,) = {c.parent for c in tmp.rglob("config.json")}
        shutil.rmtree(out, ignore_errors=True)
        written.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.stats_json).write_text(
        json.dumps(
            {
                "load_seconds": load_s,
                # AutoRound quantizes and packs in one call; this is both (the write is ~1 s).
                "quantize_seconds": quantize_s,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "quantize_config": {
                    "tool": f"auto-round {auto_round.__version__}",
                    "bits": args.bits,
                    "group_size": args.group_size,
                    "sym": args.sym,
                    "iters": args.iters,
                    "lr": args.lr if args.lr is not None else 1.0 / args.iters,
                    "nsamples": n,
                    "seqlen": seqlen,
                    "torch_threads": torch.get_num_threads(),
                },
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
