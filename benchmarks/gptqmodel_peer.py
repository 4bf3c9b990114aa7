"""One GPTQModel 7.7 quantization on given calibration windows: the peer rows of accuracy.py.

    GPTQMODEL_CPU_WORKERS=2 benchmarks/.venv-gptqmodel/bin/python benchmarks/gptqmodel_peer.py \
        --model /tmp/tsq-accuracy/smollm2-hf \
        --calib /tmp/tsq-accuracy/calib-32x256-seed0.safetensors \
        --bits 3 --group-size 64 [--mse 2.4] [--gptaq-alpha 0.25] \
        --output DIR --stats-json stats.json

Runs in GPTQModel's own venv (benchmarks/setup_gptqmodel.sh), never imports tsq_vllm. The
calibration windows are the exact token ids tsq used (a safetensors file, input_ids [n, L]); the
model is loaded in fp32 like tsq's. Everything else is GPTQModel's default (symmetric, damp 0.05,
act_group_aware), except `mse` and GPTAQ when given. GPTQModel's GPTAQ switch is
`QuantizeConfig(gptaq=GPTAQConfig(alpha=..., device="auto"))` (alpha 0.25 is its default and the
GPTAQ paper's; its README calls the mode experimental). Writes the checkpoint GPTQModel saves and
the quantize() wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (fp32)")
    p.add_argument("--calib", required=True, help="safetensors file with input_ids [n, L]")
    p.add_argument("--bits", type=int, required=True, help="bits per weight")
    p.add_argument("--group-size", type=int, required=True, help="group size")
    p.add_argument(
        "--mse",
        type=float,
        default=0.0,
        help="GPTQModel's mse scale search norm (0 = off, its default)",
    )
    p.add_argument(
        "--gptaq-alpha",
        type=float,
        default=None,
        help="turn on GPTQModel's GPTAQ mode with this alpha (its default is 0.25; off if absent)",
    )
    p.add_argument("--output", required=True, help="checkpoint directory")
    p.add_argument("--stats-json", required=True, help="where to write timings")
    args = p.parse_args()

    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import GPTAQConfig
    from safetensors.torch import load_file

    ids = load_file(args.calib)["input_ids"]  # [n, L]
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids]
    gptaq = None if args.gptaq_alpha is None else GPTAQConfig(alpha=args.gptaq_alpha, device="auto")
    qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, mse=args.mse, gptaq=gptaq)
    t = time.perf_counter()
    model = GPTQModel.load(args.model, qcfg, device="cpu", dtype=torch.float32)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    model.quantize(calibration, batch_size=1)
    quantize_s = time.perf_counter() - t
    t = time.perf_counter()
    model.save(args.output)
    write_s = time.perf_counter() - t
    Path(args.stats_json).write_text(
        json.dumps(
            {
                "load_seconds": load_s,
                "quantize_seconds": quantize_s,
                "write_seconds": write_s,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "quantize_config": {
                    "bits": qcfg.bits,
                    "group_size": qcfg.group_size,
                    "sym": qcfg.sym,
                    "damp_percent": qcfg.damp_percent,
                    "desc_act": qcfg.desc_act,
                    "act_group_aware": qcfg.act_group_aware,
                    "mse": qcfg.mse,
                    "gptaq_alpha": None if qcfg.gptaq is None else qcfg.gptaq.alpha,
                },
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
