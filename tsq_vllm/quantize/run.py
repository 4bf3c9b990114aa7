"""One quantization job from options to checkpoint: what the CLI runs, callable from Python.

    from tsq_vllm.quantize.options import QuantizeOptions
    from tsq_vllm.quantize.run import run_quantization
    job = run_quantization(QuantizeOptions(model="smollm2", output="./m-int3"))
    job.result.packed, job.result.stats   # the packed tensors and statistics of every linear

The order is the point: every check that needs no weights (flags, output path, model path,
calibration text, every linear's shape against bits and group size, enough calibration tokens)
runs before the model's weights are read, so bad input costs seconds, not a calibration run.
"""

from __future__ import annotations

import logging
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .options import QuantizeOptions, parse_size
from .pipeline import QuantizeResult

__all__ = ["UsageError", "Resumable", "QuantizationJob", "run_quantization", "peak_rss_mib"]

logger = logging.getLogger("tsq_vllm.quantize")


class UsageError(ValueError):
    """Bad input detected before any work: the CLI reports it as one line with exit status 2."""


@dataclass(frozen=True)
class Resumable:
    """Attached as `.resumable` to the KeyboardInterrupt of an interrupted run that finished some
    decoder layers: they are kept in `directory` for `--resume`."""

    directory: Path
    done: int
    total: int


@dataclass
class QuantizationJob:
    """`model` is the quantized model as far as it is held in memory: a streamed source leaves
    only its skeleton with the unquantized tensors (the checkpoint on disk is the whole model)."""

    output: Path
    model: nn.Module
    result: QuantizeResult
    summary: dict[str, Any] = field(default_factory=dict)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_quantization(opts: QuantizeOptions, *, progress: bool = False) -> QuantizationJob:
    """Validate, calibrate, quantize and write the checkpoint described by `opts`."""
    import tsq_vllm

    from ..checkpoint.atomic import check_output, check_writable, remove_stale_partials
    from ..checkpoint.hf import CheckpointSpec, finish_checkpoint
    from ..checkpoint.journal import JOURNAL_NAME, Journal
    from ..data import check_text_source, load_documents, sample_windows, tokenize_documents
    from ..models import check_quantizable, load_config, load_tokenizer, resolve_source
    from .layer_store import LayerStore, journal_key
    from .pipeline import quantize_model
    from .preflight import (
        check_head,
        check_seqlen,
        check_source_files,
        protected_paths,
        warn_unservable,
    )
    from .source import open_model, storage_dtype

    start = time.perf_counter()
    try:
        src = resolve_source(opts.model, opts.gguf_file)
        check_output(opts.output_path, opts.overwrite, protected_paths(src))
        remove_stale_partials(opts.output_path)
        check_writable(opts.output_path)
        check_text_source(opts.calib)
        config = load_config(src)
        n_linears, n_layers = check_quantizable(
            config, opts.stored_bits, opts.group_size, bcq=opts.checkpoint_format == "bcq"
        )
        if opts.quantize_lm_head:
            check_head(config, opts.stored_bits, opts.group_size)
            n_linears += 1
        check_seqlen(config, opts.seqlen)
        check_source_files(src, config)
        dtype = storage_dtype(src, config, opts.dtype)
        tokenizer = load_tokenizer(src)
        docs = load_documents(opts.calib, split="calib")
        windows = sample_windows(
            tokenize_documents(tokenizer, docs), opts.nsamples, opts.seqlen, opts.seed
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    warn_unservable(config)
    logger.info(
        "model %s: %d linears to quantize to %d bits, group %d%s",
        src.label,
        n_linears,
        opts.bits,
        opts.group_size,
        f" (GPTQT from {opts.intermediate_bits} bits, written as {opts.checkpoint_format})"
        if opts.method == "gptqt"
        else "",
    )

    output = opts.output_path.absolute()
    key = journal_key(opts, windows, src, n_layers, tsq_vllm.__version__)
    try:
        journal = Journal.resume(output, key) if opts.resume else Journal.create(output, key)
    except ValueError as e:
        raise UsageError(str(e)) from e
    try:
        t = time.perf_counter()
        model, streamer = open_model(src, config)
        if streamer is not None and opts.quantize_lm_head:
            # lm_head, which is quantized after the stack (calibration never runs it otherwise).
            streamer.load_outside(with_output=True)
        load_s = time.perf_counter() - t
        store = LayerStore(model, journal, streamer, opts, dtype)
        result = quantize_model(model, windows, opts, progress=progress, store=store)
        if streamer is not None and not opts.quantize_lm_head:
            streamer.load_outside(with_output=True)  # lm_head, for the checkpoint
        qconfig = opts.quantization_config(
            model_source=src.label, tool_version=tsq_vllm.__version__
        )
        t = time.perf_counter()
        spec = CheckpointSpec(
            model, qconfig, tokenizer, opts.overwrite, parse_size(opts.max_shard_size), dtype
        )
        finish_checkpoint(
            journal.directory,
            store.checkpoint_tensors(result.packed),
            spec,
            output,
            journal.discard_layers,
        )
    except KeyboardInterrupt as e:
        # Ctrl-C or SIGTERM: the finished layers stay for --resume; nothing to keep otherwise.
        if journal.done and (journal.directory / JOURNAL_NAME).is_file():
            e.resumable = Resumable(journal.directory, journal.done, n_layers)  # type: ignore[attr-defined]
        else:
            shutil.rmtree(journal.directory, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(journal.directory, ignore_errors=True)
        raise
    summary = {
        "output": str(output),
        "linears": len(result.stats),
        "tokens": result.tokens,
        "load_seconds": load_s,
        "quantize_seconds": result.seconds,
        "write_seconds": time.perf_counter() - t,
        "total_seconds": time.perf_counter() - start,
        "peak_rss_mib": peak_rss_mib(),
        "bytes": sum(f.stat().st_size for f in output.iterdir() if f.is_file()),
        "resumed_layers": store.resume_at,
    }
    return QuantizationJob(output, model, result, summary)
