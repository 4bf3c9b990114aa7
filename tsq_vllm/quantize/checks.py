"""The pipeline's checks of each quantized linear, and its log line.

A NaN/inf in a weight, an input moment or a scale is refused with one line naming the linear; a
negative scale is a bug unless the unbounded ablation (--scale-box 0) asked for it.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["check_finite", "check_positive", "log_linear"]

logger = logging.getLogger("tsq_vllm.quantize")


_NON_FINITE = {
    "weight": "the weight contains {bad} NaN/inf value(s) of {n}: the source model is corrupt; "
    "re-download or re-export it",
    "inputs": "its calibration inputs contain NaN/inf (the embeddings or layers in front of it "
    "give non-finite activations): the source model is corrupt; re-download or re-export it",
    "scales": "quantizing gave {bad} NaN/inf scale(s), which are never written: retry with "
    "--no-stage2 or a larger --damp",
}


def check_finite(name: str, what: str, t: torch.Tensor) -> None:
    """A NaN/inf would otherwise surface as a meaningless packing or Cholesky error, or be
    written."""
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{name}: " + _NON_FINITE[what].format(bad=bad, n=t.numel()))


def check_positive(name: str, scales: torch.Tensor, boxed: bool) -> None:
    """The paper requires s > 0; the scale box guarantees it, so a negative one there is a bug.

    (A scale that fp16 rounds to 0 belongs to a group of weights below fp16's range: harmless.)

    Only the unbounded ablation (--scale-box 0) may flip a scale's sign: that is written, with a
    warning, because it is what the ablation measures.
    """
    bad = int((scales < 0).sum())
    if not bad:
        return
    if boxed:
        raise ValueError(
            f"{name}: {bad} of {scales.numel()} scales are negative although stage 2 "
            f"kept them in its box: this is a bug; retry with --no-stage2 and report it"
        )
    logger.warning(
        "%s: %d of %d scales are negative (--scale-box 0 leaves stage 2 unbounded)",
        name,
        bad,
        scales.numel(),
    )


def log_linear(name: str, stats: dict[str, float]) -> None:
    # rel error = E‖QX − WX̃‖² / E‖WX̃‖² (the true eq. (7), constant included); energy = E‖QX‖² /
    # E‖WX̃‖².
    quality = ""
    if "rel_error" in stats:
        quality = (
            f"rel error {stats['rel_error_gptq']:.4g} -> {stats['rel_error']:.4g}, output energy "
            f"{stats['energy_ratio_gptq']:.3f} -> {stats['energy_ratio']:.3f} after stage 2; "
        )
    if "time_convert" in stats:  # GPTQT: layer losses of the b0-bit pass and the binary coding
        logger.info(
            "%s: loss %.4g (b0-bit GPTQ) -> %.4g (binary coding); grid %.2fs, gptq %.2fs, "
            "convert %.2fs",
            name,
            stats["loss_gptq"],
            stats["loss"],
            stats["time_grid"],
            stats["time_gptq"],
            stats["time_convert"],
        )
        return
    logger.info(
        "%s: %sgrid %.2fs, gptq %.2fs, stage2 %.2fs",
        name,
        quality,
        stats["time_grid"],
        stats["time_gptq"],
        stats["time_stage2"],
    )
