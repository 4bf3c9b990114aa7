"""Peak memory and time of one linear's factorizations: the code before `HessianFactor` and now.

    python benchmarks/factor_memory.py                 # K = 4096 and 14336, results markdown
    python benchmarks/factor_memory.py --k 512 --output /tmp/f.md   # a quick check

Each (K, path, version) runs in a child process of its own on random inputs (a diagonally
dominant SPD Hd in float32, R, W [4096, K], float64 accumulators), so one measurement's freed
memory cannot lower another's. The child resets its peak RSS (/proc/self/clear_refs) once the
inputs exist and reports the growth of VmHWM over VmRSS during the path, and the path's time.
Paths, at the default precision (float64):
  gptq      U, the upper Cholesky factor of Hd⁻¹ (plain GPTQ, one linear)
  gptaq     GPTAQ's target W − α·W R Hd⁻¹ and then U (the default run, one linear)
  qkv       gptaq for three linears of one input, W [4096 | 1024 | 1024, K] (Llama-3-8B's
            q/k/v_proj): one shared factorization now, three before (run for K ≤ 8192 only)
  finalize  the accumulators H, R (float64) and D (float32) to the float32 moments
"old" is a copy of the code before this change (two Choleskys of Hd; whole-matrix temporaries);
"new" is the library's. Both give the same bits (tests/core/test_gptq.py, test_hessian.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tsq_vllm.core import HessianAccumulator, HessianFactor, asymmetric_target  # noqa: E402
from tsq_vllm.core.gptq import inverse_hessian_factor  # noqa: E402

N_OUT = 4096  # rows of W: Llama-3-8B's down_proj is [4096, 14336]
ALPHA = 0.25  # the default --gptaq-alpha
PATHS = ("gptq", "gptaq", "qkv", "finalize")
QKV_ROWS = (4096, 1024, 1024)


def _old_inverse_hessian_factor(H: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(H.to(dtype))
    assert not int(info)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True).float()


def _old_asymmetric_target(W, H, R, alpha, dtype):
    L, info = torch.linalg.cholesky_ex(H.to(dtype))
    assert not int(info)
    WR = W.to(dtype) @ R.to(dtype)
    return (W.to(dtype) - alpha * torch.cholesky_solve(WR.t(), L).t()).to(W.dtype)


def _old_finalize(acc: HessianAccumulator):
    H = 0.5 * (acc.H + acc.H.t())
    R = None if acc.R is None else acc.R.float()
    H32 = H.float()
    del H
    assert acc.D is not None
    return H32, R, (0.5 * (acc.D + acc.D.t())).float()


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(K: int, path: str) -> dict:
    g = torch.Generator().manual_seed(K)
    if path == "finalize":
        acc = HessianAccumulator(K, with_r=True)
        acc.H.normal_(generator=g)
        assert acc.R is not None and acc.D is not None
        acc.R.normal_(generator=g)
        acc.D.normal_(generator=g)
        acc.count = 1
        return {"acc": acc}
    Hd = torch.rand(K, K, generator=g)
    Hd = Hd.add_(Hd.t().clone()).mul_(0.5)  # symmetric, entries in [0, 1)
    Hd.diagonal().add_(K)  # diagonally dominant: positive definite
    out = {"Hd": Hd}
    if path in ("gptaq", "qkv"):
        out["R"] = torch.randn(K, K, generator=g).mul_(0.01)
        rows = QKV_ROWS if path == "qkv" else (N_OUT,)
        out["Ws"] = [torch.randn(n, K, generator=g) for n in rows]
    return out


def _run(version: str, path: str, x: dict) -> list:
    f64 = torch.float64
    if path == "finalize":
        acc = x.pop("acc")
        return list(_old_finalize(acc) if version == "old" else acc.take())
    if path == "gptq":
        if version == "old":
            return [_old_inverse_hessian_factor(x["Hd"], f64)]
        return [inverse_hessian_factor(x["Hd"], f64)]
    out = []
    factor = HessianFactor(x["Hd"], f64, solves=len(x["Ws"]), uses=len(x["Ws"]))
    for W in x["Ws"]:  # one linear after the other, as the pipeline runs them
        if version == "old":
            out += [_old_asymmetric_target(W, x["Hd"], x["R"], ALPHA, f64)]
            out += [_old_inverse_hessian_factor(x["Hd"], f64)]
        else:
            out += [asymmetric_target(W, factor, x["R"], ALPHA), factor.inverse_factor()]
    return out


def child(K: int, path: str, version: str) -> dict:
    x = _inputs(K, path)
    clear = Path("/proc/self/clear_refs")
    clear.write_text("5")  # reset VmHWM to the current RSS: the inputs' own build peak is gone
    base = _status("VmRSS")
    t = time.perf_counter()
    out = _run(version, path, x)
    seconds = time.perf_counter() - t
    peak = _status("VmHWM")
    kept = sum(o.numel() * o.element_size() for o in {id(o): o for o in out}.values())
    return {"peak_delta": peak - base, "kept": kept, "seconds": seconds}


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), ""
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    return {
        "cpu": model,
        "avx512": " ".join(sorted(f for f in flags if f.startswith("avx512"))) or "none",
        "cores_visible": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[4096, 14336])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--output", default=str(ROOT / "benchmarks/results/factor_memory.md"))
    p.add_argument("--child", nargs=3, metavar=("K", "PATH", "VERSION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        K, path, version = args.child
        print(json.dumps(child(int(K), path, version)))
        return

    mib = 2**20
    rows = []
    for K in args.k:
        for path in args.paths:
            if path == "qkv" and K > 8192:
                continue  # no input of that width feeds more than one linear in Llama-3-8B
            for version in ("old", "new"):
                cmd = [sys.executable, __file__, "--child", str(K), path, version]
                r = subprocess.run(cmd, capture_output=True, text=True, check=True)
                res = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append({"K": K, "path": path, "version": version, **res})
                print(
                    f"K={K} {path:8s} {version}: peak +{res['peak_delta'] / mib:.0f} MiB, "
                    f"{res['seconds']:.1f} s",
                    flush=True,
                )

    m = machine()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    env = " ".join(
        f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
    )
    lines = [
        "# Peak memory and time of one linear's factorizations (old code vs `HessianFactor`)",
        "",
        f"Command: `{env + ' ' if env else ''}python {shlex.join(sys.argv)}` ({now}).",
        f"Machine: {m['cpu']}; avx512 flags: {m['avx512']}; {m['cores_visible']} core(s) visible, "
        f"torch {m['torch']} with {m['torch_threads']} thread(s), Python {m['python']}; a machine "
        "shared with other jobs, so times are indicative.",
        "",
        "Each row is a child process of its own; peak = growth of VmHWM over the RSS once the "
        "inputs exist (reset through /proc/self/clear_refs); kept = the results it returns. "
        f"W is [{N_OUT}, K]; float64 factorizations (the default precision). One float64 K×K "
        "matrix is " + ", ".join(f"{K * K * 8 / mib:.0f} MiB at K = {K}" for K in args.k) + ".",
        "",
        "| K | path | version | peak (MiB) | kept (MiB) | time (s) |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['K']} | {r['path']} | {r['version']} | {r['peak_delta'] / mib:.0f} | "
            f"{r['kept'] / mib:.0f} | {r['seconds']:.1f} |"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
