"""Resident memory left behind by reading a source model's tensors one at a time.

    python benchmarks/source_memory.py --model /work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf

Opens the model the way the quantizer does (`tsq_vllm.quantize.source.open_model`: a meta
skeleton and the source's tensors by name), reads every decoder-layer tensor through
`SourceTensors.get` in layer order, dropping each one, and prints the process's RssAnon, RssFile
and VmHWM (from /proc/self/status) before and after, with the bytes read. A reader that goes
through a memory map of the file leaves every page it touched in RssFile for as long as the map
lives; one that reads with plain file reads leaves none. Run it with `PYTHONPATH` set to another
checkout to measure that checkout's reader.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

MIB = 1 << 20


def _status() -> dict[str, float]:
    text = Path("/proc/self/status").read_text()
    out = {}
    for key in ("RssAnon", "RssFile", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        out[key] = int(m.group(1)) / 1024 if m else float("nan")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a .gguf file or an HF model directory")
    args = p.parse_args()

    import tsq_vllm
    from tsq_vllm.models import find_decoder_layers, load_config, resolve_source
    from tsq_vllm.quantize.source import open_model

    src = resolve_source(args.model)
    model, streamer = open_model(src, load_config(src))
    if streamer is None:
        raise SystemExit(f"{args.model} cannot be streamed: it was loaded whole")
    before = _status()
    read = 0
    prefix, stack = find_decoder_layers(model)
    for i, layer in enumerate(stack):
        for name, _ in layer.named_parameters():
            t = streamer.tensors.get(f"{prefix}.{i}.{name}")
            read += t.numel() * t.element_size()
            del t
    after = _status()
    print(json.dumps({
        "model": args.model,
        "tsq_vllm": str(Path(tsq_vllm.__file__).parent),
        "read_mib": round(read / MIB, 1),
        "before_mib": {k: round(v, 1) for k, v in before.items()},
        "after_mib": {k: round(v, 1) for k, v in after.items()},
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
