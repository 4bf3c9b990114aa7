"""Which step of a quantization run sets its peak memory: RSS sampled with the call stack.

    python benchmarks/memory_timeline.py -- --model DIR --output OUT --bits 3 --group-size 64 ...

Runs `python -m tsq_vllm.quantize` with the arguments after `--` in this process, while a thread
samples VmRSS (/proc/self/status) every `--interval` seconds together with the innermost
`--depth` tsq_vllm functions on the main thread's stack. Prints the run's peak and, for each
stack seen, the highest RSS it was sampled at, highest first: the steps that set the peak, and
by how much each stays below it. The CLI fixes glibc's mmap threshold (`quantize/heap.py`), so
freed tensors leave RSS and the samples follow the live tensors. A sample is a moment: a
temporary shorter than the interval can be missed, so VmHWM (also printed) is the true peak.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from pathlib import Path


def _status(key: str) -> float:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


def _stack(thread_id: int, depth: int) -> str:
    frame = sys._current_frames().get(thread_id)
    names = []
    while frame is not None:
        if "tsq_vllm" in frame.f_code.co_filename:
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    return " < ".join(names[:depth]) or "(outside tsq_vllm)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interval", type=float, default=0.02, help="seconds between samples")
    p.add_argument("--depth", type=int, default=4, help="innermost tsq_vllm frames per label")
    p.add_argument("--top", type=int, default=15, help="stacks to print")
    p.add_argument("quantize_args", nargs=argparse.REMAINDER, help="-- then the CLI's arguments")
    args = p.parse_args()
    cli = args.quantize_args[1:] if args.quantize_args[:1] == ["--"] else args.quantize_args

    from tsq_vllm.quantize.__main__ import main as quantize_main

    main_id = threading.get_ident()
    highest: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            label = _stack(main_id, args.depth)
            highest[label] = max(highest.get(label, 0.0), _status("VmRSS"))
            time.sleep(args.interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        rc = quantize_main(cli)
    finally:
        done.set()
        sampler.join()
    peak = max(highest.values())
    print(f"quantize exit {rc}; VmHWM {_status('VmHWM'):.0f} MiB; highest sample {peak:.0f} MiB")
    print("| highest RSS (MiB) | below the peak | innermost tsq_vllm frames |")
    print("|---:|---:|---|")
    for label, rss in sorted(highest.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {rss:.0f} | {peak - rss:.0f} | {label} |")
    return 0 if rc in (0, None) else int(rc)


if __name__ == "__main__":
    raise SystemExit(main())
