"""The checks of `--method` and its flags, for `QuantizeOptions`.

"tsq" takes none of GPTQT's flags and writes GPTQ; "gptqt" takes k = --bits in {2, 3} of binary
coding from b0 = --intermediate-bits, written as BCQ or (b0 = 4) as plain GPTQ, and refuses the
tsq-only steps. "auto" resolves to the method's own checkpoint format.
"""

from __future__ import annotations

from typing import Any

from ..format.bcq import BCQ_FORMAT
from ..format.gptq import CHECKPOINT_FORMATS
from ..format.packing import SUPPORTED_BITS
from .scheme import BCQ_BITS, INTERMEDIATE_BITS, METHODS

__all__ = ["AUTO_FORMAT", "OUTPUT_FORMATS", "check_method", "flag_of"]

AUTO_FORMAT = "auto"
OUTPUT_FORMATS = (AUTO_FORMAT, *CHECKPOINT_FORMATS, BCQ_FORMAT)


def flag_of(name: str, default: Any) -> str:
    """The CLI flag of a field: booleans that default to True are switched off by --no-<name>."""
    base = name.replace("_", "-")
    return f"--no-{base}" if default is True else f"--{base}"


def check_method(opts: Any) -> str:
    """Raise a one-line ValueError for a flag of `opts` (a `QuantizeOptions`) that its method
    does not take; returns the checkpoint format, "auto" resolved."""
    if opts.method not in METHODS:
        raise ValueError(f"--method {opts.method!r} is not supported: use one of {METHODS}")
    if opts.checkpoint_format not in OUTPUT_FORMATS:
        raise ValueError(
            f"--checkpoint-format {opts.checkpoint_format!r} is not supported: use one of "
            f"{OUTPUT_FORMATS}"
        )
    gptqt = opts.method == "gptqt"
    fmt = opts.checkpoint_format
    if fmt == AUTO_FORMAT:
        fmt = BCQ_FORMAT if gptqt else "gptq"
    if not gptqt:
        if fmt == BCQ_FORMAT:
            raise ValueError(
                "--checkpoint-format bcq stores binary coding: add --method gptqt, or write "
                "gptq / gptq_v2"
            )
        for name, default in (
            ("intermediate_bits", 4),
            ("requantize", True),
            ("reexplore", True),
        ):
            if getattr(opts, name) != default:
                flag = flag_of(name, default)
                raise ValueError(f"{flag} applies to --method gptqt only: add --method gptqt")
        return fmt
    if opts.bits not in BCQ_BITS:
        raise ValueError(
            f"--bits {opts.bits} is not supported with --method gptqt: binary coding uses "
            f"{' or '.join(map(str, BCQ_BITS))} bits"
        )
    if opts.intermediate_bits not in INTERMEDIATE_BITS:
        raise ValueError(
            f"--intermediate-bits {opts.intermediate_bits} is not supported: use one of "
            f"{', '.join(map(str, INTERMEDIATE_BITS))}"
        )
    if fmt != BCQ_FORMAT and opts.intermediate_bits not in SUPPORTED_BITS:
        raise ValueError(
            f"--checkpoint-format {fmt} cannot hold "
            f"--intermediate-bits {opts.intermediate_bits} codes (GPTQ packs "
            f"{', '.join(map(str, SUPPORTED_BITS))} bits): write --checkpoint-format bcq or "
            "use --intermediate-bits 4"
        )
    if not opts.gptq:
        raise ValueError(
            "--no-gptq (round to nearest) is a tsq baseline: GPTQT's passes are GPTQ; drop it"
        )
    if opts.energy_match:
        raise ValueError("--energy-match applies to --method tsq only: drop it")
    if opts.refine_block:
        raise ValueError(
            f"--refine-block {opts.refine_block} applies to --method tsq only (it refines "
            "uniform-grid scales): drop it"
        )
    if opts.quantize_lm_head and fmt == BCQ_FORMAT:
        raise ValueError(
            "--quantize-lm-head with --checkpoint-format bcq is not supported (BCQ serving has "
            "no quantized lm_head): add --checkpoint-format gptq or drop --quantize-lm-head"
        )
    return fmt
