"""Compile every Triton kernel variant for real NVIDIA targets without a GPU, and report registers.

    python -m tools.compile_check [--arch 80 90] [--quick] [--jobs 2] [--out FILE]

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole pipeline
(TTIR → TTGIR → LLVM → PTX → cubin) with the ptxas shipped in the triton wheel; no driver is
needed. Registers and spills come from ptxas' own `-v` report, which Triton prints when
`knobs.nvidia.dump_ptxas_log` is set (so every variant is compiled afresh: `always_compile`).

The signature mirrors what the JIT specializes at run time for contiguous checkpoint tensors:
unit strides become constexpr 1, pointers, sizes and leading strides carry divisibility-by-16.
Variants: kernel kind (gemv, gemm at the small-prefill and large-prefill block sizes of the
kernel's own `tsq_vllm.kernels.configs.CONFIGS`) × bits ×
group size × activation dtype, act-order variants per kind × bits × dtype, the split-K
reduction, and the BCQ kernel's tile classes × planes × group × dtype (`tools.compile_bcq`).
Exit status 1 if any variant fails to compile.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from tools.compile_bcq import bcq_signature, bcq_variants

__all__ = [
    "Variant",
    "Result",
    "variants",
    "compile_variant",
    "loop_spills",
    "run",
    "to_markdown",
    "summary",
    "main",
]

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
DTYPES = ("fp16", "bf16")
# The shape classes of `tsq_vllm.kernels.configs.CONFIGS` compiled here (gemm-M32 differs from
# gemm-M64 only in BLOCK_M and is covered by it).
LABELS = ("gemv", "gemm-M64", "gemm-M128+")


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str  # "gemm", "gemv", "reduce" or "bcq" (bits: its number of planes)
    bits: int
    group: int
    dtype: str
    act_order: bool
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Result:
    variant: Variant
    arch: int
    ok: bool
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    loop_spills: int | None = None  # LDL/STL instructions inside a loop of the SASS
    shared: int | None = None
    seconds: float = 0.0
    error: str = ""


def variants(quick: bool = False) -> list[Variant]:
    """All variants, or with `quick` a subset that still covers every kernel, 3-bit straddles,
    act-order and both dtypes."""
    from tsq_vllm.kernels.configs import CONFIGS, fit_block_k

    out = []
    for label in LABELS:
        c = CONFIGS[label]
        shape = (c.block_m, c.block_n)
        for bits in BITS:
            for dtype in DTYPES:
                for group in GROUPS:
                    k = fit_block_k(c.block_k, group, False)
                    out.append(
                        Variant(
                            label,
                            c.kind,
                            bits,
                            group,
                            dtype,
                            False,
                            *shape,
                            k,
                            c.num_warps,
                            c.num_stages,
                        )
                    )
                k = fit_block_k(c.block_k, 128, True)
                out.append(
                    Variant(
                        label, c.kind, bits, 128, dtype, True, *shape, k, c.num_warps, c.num_stages
                    )
                )
    for dtype in DTYPES:
        out.append(Variant("reduce", "reduce", 0, 0, dtype, False, 0, 0, 0, 4, 3))
    out += bcq_variants(Variant, GROUPS, DTYPES)
    if quick:
        out = [
            v
            for v in out
            if v.kind == "reduce"
            or (v.kind == "bcq" and v.bits == 3 and v.group == 128 and v.dtype == "bf16")
            or (v.bits == 3 and v.group == 128 and v.dtype == "bf16")
            or (v.bits == 4 and v.group == 32 and v.dtype == "fp16" and not v.act_order)
        ]
    return out


def _signature(v: Variant):
    from tsq_vllm.kernels import triton_jit as tj

    if v.kind == "bcq":
        return bcq_signature(v)
    act = "fp16" if v.dtype == "fp16" else "bf16"
    if v.kind == "reduce":
        fn = tj._splitk_reduce_kernel
        sig = {
            "ws_ptr": "*fp32",
            "y_ptr": f"*{act}",
            "M": "i32",
            "N": "i32",
            "SPLIT_K": "i32",
            "stride_ym": "i32",
            "stride_yn": "constexpr",
            "BLOCK": "constexpr",
        }
        const = {"stride_yn": 1, "BLOCK": 1024}
        div16 = ["ws_ptr", "y_ptr", "N", "stride_ym"]
        return fn, sig, const, div16
    fn = tj._gemm_kernel if v.kind == "gemm" else tj._gemv_kernel
    out_t = act if v.kind == "gemm" else "fp32"  # the GEMV writes the fp32 split-K workspace
    sig = {
        "x_ptr": f"*{act}",
        "qw_ptr": "*i32",
        "qz_ptr": "*i32",
        "s_ptr": "*fp16",
        "g_ptr": "*i32",
        ("y_ptr" if v.kind == "gemm" else "out_ptr"): f"*{out_t}",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "M_BUCKET": "i32",
    }
    if v.kind == "gemv":
        sig["K_PER_SPLIT"] = "i32"
    unit = {"stride_xk", "stride_qn", "stride_zn", "stride_sn", "stride_yn", "stride_on"}
    strides = [
        "stride_xm",
        "stride_xk",
        "stride_qk",
        "stride_qn",
        "stride_zg",
        "stride_zn",
        "stride_sg",
        "stride_sn",
    ]
    strides += (
        ["stride_ym", "stride_yn"] if v.kind == "gemm" else ["stride_os", "stride_om", "stride_on"]
    )
    for name in strides:
        sig[name] = "constexpr" if name in unit else "i32"
    const = {name: 1 for name in strides if name in unit}
    meta = {
        "BITS": v.bits,
        "GROUP_SIZE": v.group,
        "ZERO_OFFSET": 1,
        "ACT_ORDER": v.act_order,
        "DOT_F32": False,
        "BLOCK_M": v.block_m,
        "BLOCK_N": v.block_n,
        "BLOCK_K": v.block_k,
    }
    if v.kind == "gemm":
        meta["GROUP_M"] = 8
    for name, value in meta.items():
        sig[name] = "constexpr"
        const[name] = value
    div16 = [n for n, t in sig.items() if t.startswith("*")] + [
        "N",
        "K",
        "stride_xm",
        "stride_qk",
        "stride_sg",
    ]
    div16 += ["stride_ym"] if v.kind == "gemm" else ["K_PER_SPLIT", "stride_os", "stride_om"]
    return fn, sig, const, div16


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spills": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


_SASS_INST = re.compile(r"/\*([0-9a-f]+)\*/\s+([^;]*);")


def loop_spills(cubin: bytes) -> int | None:
    """LDL/STL (local-memory spill traffic) inside any loop, from the cubin's SASS; a backward
    branch from address a to t < a delimits a loop [t, a]. None when cuobjdump is unavailable.

    ptxas sometimes spills a few bytes around the K loop (live-ins stored once, reloaded in the
    epilogue); those cost nothing per iteration, which this count separates from real spills.
    """
    import triton

    try:
        tool = triton.knobs.nvidia.cuobjdump.path
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            sass = subprocess.run(
                [tool, "-sass", f.name], capture_output=True, text=True, check=True
            ).stdout
    except Exception:
        return None
    insts = [(int(a, 16), text.strip()) for a, text in _SASS_INST.findall(sass)]
    loops = []
    for addr, text in insts:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    return sum(
        1
        for addr, text in insts
        if re.search(r"\b(LDL|STL)\b", text) and any(lo <= addr <= hi for lo, hi in loops)
    )


def compile_variant(v: Variant, arch: int) -> Result:
    """Compile one variant for sm_`arch`; never raises (errors land in `Result.error`)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from tsq_vllm.kernels import triton_kernels as tk

    t0 = time.perf_counter()
    try:
        if tk.is_interpreted():
            raise RuntimeError("TRITON_INTERPRET=1 is set: unset it to compile for a GPU target")
        fn, sig, const, div16 = _signature(v)
        names = fn.arg_names
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
        log = io.StringIO()
        with (
            triton.knobs.nvidia.scope(),
            triton.knobs.compilation.scope(),
            contextlib.redirect_stdout(log),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            triton.knobs.nvidia.dump_ptxas_log = True
            triton.knobs.compilation.always_compile = True
            kernel = triton.compile(
                src,
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": v.num_warps, "num_stages": v.num_stages},
            )
        text = log.getvalue()
        regs = _PTXAS["registers"].search(text)
        spills = _PTXAS["spills"].search(text)
        stack = _PTXAS["stack"].search(text)
        return Result(
            v,
            arch,
            True,
            registers=int(regs.group(1)) if regs else None,
            spill_stores=int(spills.group(1)) if spills else None,
            spill_loads=int(spills.group(2)) if spills else None,
            stack=int(stack.group(1)) if stack else None,
            loop_spills=loop_spills(kernel.asm["cubin"]),
            shared=getattr(kernel.metadata, "shared", None),
            seconds=time.perf_counter() - t0,
        )
    except Exception as e:  # a compile error is a result to report, not a crash
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        return Result(v, arch, False, seconds=time.perf_counter() - t0, error=msg[:300])


def _compile_job(job: tuple[Variant, int]) -> Result:
    return compile_variant(*job)


def run(archs=(80, 90), quick: bool = False, jobs: int = 1, kinds=None) -> list[Result]:
    todo = [(v, a) for a in archs for v in variants(quick) if not kinds or v.kind in kinds]
    if jobs <= 1:
        return [compile_variant(v, a) for v, a in todo]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_job, todo))


def _cell(x) -> str:
    return "?" if x is None else str(x)


def to_markdown(results: list[Result]) -> str:
    rows = [
        "| kernel | bits | group | dtype | act-order | block M×N×K | warps/stages | arch | "
        "registers | spill st/ld (B) | spill insts in loops | stack (B) | shared (B) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        v = r.variant
        block = "1024" if v.kind == "reduce" else f"{v.block_m}×{v.block_n}×{v.block_k}"
        status = "ok" if r.ok else f"FAIL: {r.error}"
        rows.append(
            f"| {v.label} | {v.bits or '-'} | {v.group or '-'} | {v.dtype} | "
            f"{'yes' if v.act_order else 'no'} | {block} | {v.num_warps}/{v.num_stages} | "
            f"sm_{r.arch} | {_cell(r.registers)} | {_cell(r.spill_stores)}/{_cell(r.spill_loads)} "
            f"| {_cell(r.loop_spills)} | {_cell(r.stack)} | {_cell(r.shared)} | {status} |"
        )
    return "\n".join(rows)


def summary(results: list[Result]) -> str:
    ok = [r for r in results if r.ok]
    spilled = [r for r in ok if (r.spill_stores or 0) + (r.spill_loads or 0) > 0]
    in_loop = [r for r in ok if r.loop_spills]
    unknown = [r for r in ok if r.loop_spills is None]
    lines = [
        f"{len(ok)}/{len(results)} variants compiled; {len(spilled)} spill some bytes; "
        f"{len(in_loop)} have spill instructions inside a loop"
        + (f" ({len(unknown)} not disassembled)" if unknown else "")
        + "."
    ]
    for r in spilled:
        v = r.variant
        lines.append(
            f"- spills: {v.label} {v.bits}-bit g{v.group} "
            f"{v.dtype}{' act-order' if v.act_order else ''} sm_{r.arch}: "
            f"{r.spill_stores}/{r.spill_loads} B st/ld, {r.loop_spills} in loops"
        )
    for arch in sorted({r.arch for r in results}):
        for label in dict.fromkeys(r.variant.label for r in results):
            regs = [
                r.registers
                for r in ok
                if r.arch == arch and r.variant.label == label and r.registers
            ]
            if regs:
                lines.append(f"- sm_{arch} {label}: registers {min(regs)}–{max(regs)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    ap.add_argument("--quick", action="store_true", help="a covering subset of the variants")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument(
        "--kinds", nargs="+", choices=["gemm", "gemv", "reduce", "bcq"], help="only these kernels"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    results = run(args.arch, args.quick, args.jobs, args.kinds)
    table = to_markdown(results)
    text = f"{summary(results)}\n\n{table}\n\n(compiled in {time.perf_counter() - t0:.0f} s)\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.variant} sm_{r.arch}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
