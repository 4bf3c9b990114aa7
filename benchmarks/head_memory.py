"""Peak RSS of quantizing one vocabulary-wide linear (an lm_head), whole-weight vs row blocks.

    python benchmarks/head_memory.py                        # [151936, 1536]: Qwen2.5-1.5B's head
    python benchmarks/head_memory.py --n 4096 --output /tmp/h.md   # a quick check

Each version runs in a child process of its own on the same random inputs: W [N, K], an SPD
H = XᵀX/T, R = ΔXᵀX/T and D = ΔXᵀΔX/T from T = 2K random tokens with a small ΔX, and the
default scheme (INT3 g64, stage 1, GPTAQ, GPTQ, stage 2 with R and its box, float64
factorizations). The child resets its peak RSS (/proc/self/clear_refs) once the inputs exist and
reports VmHWM after each phase, the phase's time, and a checksum of the written tensors:
  quantize   prepare_input + quantize_linear (what the pipeline's per-linear call runs)
  write      dequantize (the in-place weight) + pack (the checkpoint tensors)
"old" is the library at --old-ref (before the row blocks; `git archive` into a temporary
directory that the child imports first), "new" the working tree's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_REF = "b00b406"  # branch `factor`'s tip, the last commit before the row blocks
MIB = 2**20


def _status(field: str) -> int:
    """A /proc/self/status (or /proc/meminfo) field in bytes."""
    for src in ("/proc/self/status", "/proc/meminfo"):
        for line in Path(src).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc")


def _inputs(N: int, K: int):
    import torch

    g = torch.Generator().manual_seed(N + K)
    T = 2 * K
    X = torch.randn(T, K, generator=g, dtype=torch.float64)
    dX = 0.05 * torch.randn(T, K, generator=g, dtype=torch.float64)
    H, R, D = (X.t() @ X / T), (dX.t() @ X / T), (dX.t() @ dX / T)
    return torch.randn(N, K, generator=g), H.float(), R.float(), D.float()


def child(N: int, K: int, library: str, gptq_order: str = "") -> dict:
    sys.path.insert(0, library)

    import tsq_vllm
    from tsq_vllm.quantize import LayerScheme, method
    from tsq_vllm.quantize.layer import prepare_input

    assert Path(tsq_vllm.__file__).is_relative_to(library), tsq_vllm.__file__
    W, H, R, D = _inputs(N, K)
    # The CLI's defaults; a GPTQ order given by --gptq-order (a library from before the act-order
    # default knows only the natural order: pin "natural" to compare bytes with it).
    scheme = LayerScheme(
        bits=3, group_size=64, **({"gptq_order": gptq_order} if gptq_order else {})
    )
    try:  # the library at --old-ref has no row blocks: one read
        from tsq_vllm.quantize.row_blocks import row_blocks

        readers = len(row_blocks(*W.shape))
    except ImportError:
        readers = 1
    clear = Path("/proc/self/clear_refs")
    out: dict = {"base": _status("VmRSS"), "readers": readers}
    clear.write_text("5")  # VmHWM := VmRSS: the inputs' own build peak is gone
    t = time.perf_counter()
    qw = method.quantize_linear(W, prepare_input(H, scheme, R, D, readers=readers))
    out["quantize_s"], out["quantize_peak"] = time.perf_counter() - t, _status("VmHWM")
    clear.write_text("5")
    t = time.perf_counter()
    weight = qw.dequantize()
    packed = qw.pack("gptq")
    out["write_s"], out["write_peak"] = time.perf_counter() - t, _status("VmHWM")
    h = hashlib.sha256()
    for x in (packed.qweight, packed.qzeros, packed.scales, packed.g_idx, weight):
        h.update(x.contiguous().numpy().tobytes())
    out["sha256"] = h.hexdigest()[:16]
    out["stats"] = {k: v for k, v in qw.stats.items() if not k.startswith("time_")}
    return out


def _old_library(ref: str, into: str) -> str:
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "tsq_vllm"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    return into


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=151936)
    p.add_argument("--k", type=int, default=1536)
    p.add_argument("--old-ref", default=OLD_REF)
    p.add_argument("--versions", nargs="+", choices=("new", "old"), default=["new", "old"])
    p.add_argument(
        "--min-free-gib",
        type=float,
        default=14.0,
        help="run the old version only when MemAvailable is at least this many GiB: the machine "
        "is shared, and by its whole-weight temporaries (a float64 GPTAQ solve of [N, K], the "
        "int64 codes, ...) the old path needs about ten float32 [N, K] matrices (9 GiB here)",
    )
    p.add_argument(
        "--gptq-order",
        choices=("act", "natural"),
        help="pin the new version's GPTQ column order (default: the scheme's); the old one always "
        "runs its own default",
    )
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/head_memory.md"))
    p.add_argument("--child", nargs=4, metavar=("N", "K", "LIB", "ORDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        n, k, lib, order = args.child
        print(json.dumps(child(int(n), int(k), lib, order)))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="head_memory_") as tmp:
        libs = {"new": str(ROOT), "old": _old_library(args.old_ref, tmp)}
        for version in args.versions:
            free = _status("MemAvailable")
            if version == "old" and free < args.min_free_gib * 2**30:
                rows.append({"version": version, "skipped": f"MemAvailable {free / 2**30:.1f} GiB"})
                print(f"{version}: skipped, MemAvailable {free / 2**30:.1f} GiB", flush=True)
                continue
            order = (args.gptq_order or "") if version == "new" else ""
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(args.n),
                str(args.k),
                libs[version],
                order,
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                rows.append({"version": version, "skipped": f"exit {r.returncode}"})
                print(f"{version}: exit {r.returncode}\n{r.stderr[-2000:]}", flush=True)
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append({"version": version, **res})
            print(
                f"{version}: quantize peak {res['quantize_peak'] / MIB:.0f} MiB "
                f"({res['quantize_s']:.0f} s), write peak {res['write_peak'] / MIB:.0f} MiB, "
                f"base {res['base'] / MIB:.0f} MiB, sha256 {res['sha256']}",
                flush=True,
            )
            _write(args, rows)  # after each version: a run cut short keeps what it measured
    _write(args, rows)


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    import torch

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = " ".join(
        f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
    )
    N, K = args.n, args.k
    lines = [
        f"# Peak RSS of quantizing one [{N}, {K}] linear: the library at `{args.old_ref}` (old) "
        "vs the working tree (new)",
        "",
        f"Command: `{env + ' ' if env else ''}python {shlex.join(sys.argv)}` ({now}); old = "
        f"`{args.old_ref}`. torch {torch.__version__}, {len(os.sched_getaffinity(0))} core(s) "
        "visible, on a machine shared with other jobs (times are indicative).",
        "",
        f"One float32 [{N}, {K}] matrix is {N * K * 4 / MIB:.0f} MiB, int64 {N * K * 8 / MIB:.0f} "
        "MiB. Peaks are VmHWM of a child process (absolute RSS, inputs included), reset before "
        "each phase; base = RSS once the inputs exist. Same sha256 = the same written tensors.",
        "",
        "| version | readers | base (MiB) | quantize peak (MiB) | quantize (s) | write peak (MiB) "
        "| sha256 |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['version']} | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(
            f"| {r['version']} | {r['readers']} | {r['base'] / MIB:.0f} | "
            f"{r['quantize_peak'] / MIB:.0f} | {r['quantize_s']:.0f} | "
            f"{r['write_peak'] / MIB:.0f} | `{r['sha256']}` |"
        )
    done = [r for r in rows if "stats" in r]
    if done:
        lines += ["", "Stats (`QuantizedWeight.stats`, times left out):", ""]
        lines += [f"- {r['version']}: {json.dumps(r['stats'])}" for r in done]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
