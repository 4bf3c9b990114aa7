"""`python -m tsq_vllm.eval`: perplexity of a full-precision or quantized model on held-out text.

    python -m tsq_vllm.eval --model smollm2 --max-tokens 8192 --output-json fp.json
    python -m tsq_vllm.eval --model ./smollm2-tsq-int3 --max-tokens 8192 --output-json q.json

The default text is the test split of the built-in Wikipedia leads, which by construction shares
no article with the calibration split `python -m tsq_vllm.quantize` draws from. The text is cut
into non-overlapping windows of --seqlen tokens from its start; perplexity is exp of the mean
next-token negative log-likelihood over every predicted position. A directory whose config.json
has a tsq or GPTQ `quantization_config` is loaded with `tsq_vllm.load_quantized`; anything else
(HF directory, GGUF, hub id, `smollm2`) as a full-precision model. Both then go through the same
`perplexity` function.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

__all__ = ["perplexity", "load_for_eval", "evaluate", "main"]

PROG = "python -m tsq_vllm.eval"
DTYPES = ("float32", "bfloat16", "float16", "auto")


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Mean next-token NLL and perplexity of `model` over token windows [n, L]."""
    nll_sum, count = 0.0, 0
    for b0 in range(0, windows.shape[0], batch_size):
        ids = windows[b0 : b0 + batch_size].to(device)  # [b, L]
        logits = model(input_ids=ids, use_cache=False).logits  # [b, L, V]
        for row, target in zip(
            logits, ids, strict=True
        ):  # one window at a time keeps the fp32 copy small
            # Position t predicts token t + 1; the last position has no target.
            nll_sum += float(
                nn.functional.cross_entropy(row[:-1].float(), target[1:], reduction="sum")
            )
            count += target.numel() - 1
    nll = nll_sum / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count}


def load_for_eval(
    model: str | None, gguf_file: str | None = None, dtype: str = "float32"
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, description) for a quantized checkpoint or a full-precision source,
    computing in `dtype` ("auto": the dtype the checkpoint or source declares)."""
    from .checkpoint.hf import load_quantized
    from .models import load_model, load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    target, qc = _resolve(model, gguf_file)
    if qc is not None:
        from transformers import AutoTokenizer

        lm = load_quantized(target)
        tok = AutoTokenizer.from_pretrained(target)
        info = {"model": str(target), "kind": qc.quant_method, "quantization_config": qc.to_dict()}
    else:
        lm, tok = load_model(target), load_tokenizer(target)
        info = {"model": target.label, "kind": "fp", "quantization_config": None}
    if dtype != "auto":
        lm = lm.to(getattr(torch, dtype))
    return lm, tok, {**info, "dtype": str(next(lm.parameters()).dtype).removeprefix("torch.")}


def _resolve(model: str | None, gguf_file: str | None) -> tuple[Any, Any]:
    """(checkpoint path, its CheckpointQuantConfig) for a quantized checkpoint, else (ModelSource,
    None)."""
    from .checkpoint.config import read_quantization_config
    from .models import resolve_source

    path = Path(model).expanduser() if model else None
    if path is not None and path.is_dir() and not gguf_file:
        qc = read_quantization_config(path)
        if qc is not None:
            return path, qc
    return resolve_source(model, gguf_file), None


def evaluate(
    model: str | None,
    *,
    gguf_file: str | None = None,
    data: str = "wiki",
    seqlen: int = 512,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Load, tokenize the test text and measure perplexity; returns the JSON-ready result."""
    from .data import (
        check_text_source,
        contiguous_windows,
        load_documents,
        tokenize_documents,
    )

    if seqlen < 2:
        raise ValueError(f"--seqlen {seqlen} must be at least 2 (one token predicts the next)")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be at least 1")
    if max_tokens is not None and max_tokens < seqlen:
        raise ValueError(
            f"--max-tokens {max_tokens} is below --seqlen {seqlen}: raise it to fill one window"
        )
    _resolve(model, gguf_file)  # a bad path fails here, before the text is read
    check_text_source(data)
    docs = load_documents(data, split="test")
    start = time.perf_counter()
    lm, tok, info = load_for_eval(model, gguf_file, dtype)
    load_s = time.perf_counter() - start
    windows = contiguous_windows(tokenize_documents(tok, docs), seqlen, max_tokens)
    t = time.perf_counter()
    res = perplexity(lm.to(device), windows, batch_size=batch_size, device=device)
    return {
        **info,
        "data": f"{data}:test" if data == "wiki" else data,
        "seqlen": seqlen,
        "windows": int(windows.shape[0]),
        **res,
        "load_seconds": load_s,
        "eval_seconds": time.perf_counter() - t,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="smollm2",
        help="quantized checkpoint directory, HF model directory or id, .gguf file, or 'smollm2'",
    )
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's directory")
    p.add_argument(
        "--data",
        default="wiki",
        help="'wiki' (test split of the built-in Wikipedia leads), 'text:PATH' or "
        "'hf:NAME[:CONFIG]' (its test split)",
    )
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument(
        "--max-tokens", type=int, default=16384, help="evaluate at most this many tokens (0: all)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="windows per forward pass; quantized layers are decoded once per pass",
    )
    p.add_argument("--device", default="cpu", help="device to evaluate on, e.g. cpu or cuda:0")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="compute dtype; float32 measures every checkpoint at the same precision whatever its "
        "config declares (a float16 config would otherwise run emulated, slowly, on CPU); 'auto' "
        "keeps the declared one",
    )
    p.add_argument("--output-json", default=None, help="also write the result as JSON to this file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        res = evaluate(
            args.model,
            gguf_file=args.gguf_file,
            data=args.data,
            seqlen=args.seqlen,
            max_tokens=args.max_tokens or None,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
        )
    except (ValueError, RuntimeError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    print(
        f"{res['model']} [{res['kind']}]: ppl {res['ppl']:.4f} (nll {res['nll']:.4f}) on "
        f"{res['tokens']} tokens of {res['data']}, {res['windows']} x {res['seqlen']}; eval "
        f"{res['eval_seconds']:.0f}s, peak RSS {res['peak_rss_mib']:.0f} MiB"
    )
    if args.output_json:
        out = Path(args.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
