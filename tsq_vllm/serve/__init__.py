"""Serving tsq (and plain GPTQ) checkpoints through vLLM: `--quantization tsq`.

`register()` is the `vllm.general_plugins` entry point (pyproject.toml), so vLLM runs it in every
process it starts (API server, engine core, workers). vLLM is imported only inside it: the base
package does not depend on vLLM and `import tsq_vllm.serve` must work without it.

    python -m tsq_vllm.serve ./m-tsq-int3 --host 127.0.0.1 --port 8000 --dtype bfloat16
"""

from __future__ import annotations

from ..checkpoint.config import parse_quant_config, read_checkpoint_config

__all__ = ["register", "parse_quant_config", "read_checkpoint_config"]


def register() -> None:
    """Register the "tsq" quantization method with vLLM (idempotent)."""
    from .config import register_tsq

    register_tsq()
