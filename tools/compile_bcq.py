"""The BCQ kernel's variants and compile signature for `tools.compile_check`.

Kept beside compile_check.py (which holds the GPTQ kernels' ones) so that file stays small; the
signature mirrors what the JIT specializes at run time for contiguous checkpoint tensors.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PLANES", "bcq_signature", "bcq_variants"]

PLANES = (2, 3)


def bcq_variants(variant_cls: Any, groups: tuple[int, ...], dtypes: tuple[str, ...]) -> list[Any]:
    """Every tile class of `BCQ_CONFIGS` × planes × group × dtype, and act-order per class ×
    planes × dtype (`bits` holds the number of planes)."""
    from tsq_vllm.kernels.bcq_triton import BCQ_CONFIGS
    from tsq_vllm.kernels.configs import fit_block_k

    out = []
    for label, c in BCQ_CONFIGS.items():
        for planes in PLANES:
            for dtype in dtypes:
                for group, act in [*((g, False) for g in groups), (128, True)]:
                    out.append(
                        variant_cls(
                            label,
                            "bcq",
                            planes,
                            group,
                            dtype,
                            act,
                            c.block_m,
                            c.block_n,
                            fit_block_k(c.block_k, group, act),
                            c.num_warps,
                            c.num_stages,
                        )
                    )
    return out


def bcq_signature(v: Any) -> tuple[Any, dict[str, str], dict[str, Any], list[str]]:
    from tsq_vllm.kernels import bcq_jit

    act = "fp16" if v.dtype == "fp16" else "bf16"
    sig = {
        "x_ptr": f"*{act}",
        "b_ptr": "*i32",
        "a_ptr": "*fp16",
        "o_ptr": "*fp16",
        "g_ptr": "*i32",
        "y_ptr": f"*{act}",
        "M": "i32",
        "N": "i32",
        "K": "i32",
    }
    strides = "xm xk bi bw bn ai ag an og on ym yn".split()
    strides = [f"stride_{s}" for s in strides]
    unit = {"stride_xk", "stride_bn", "stride_an", "stride_on", "stride_yn"}
    for name in strides:
        sig[name] = "constexpr" if name in unit else "i32"
    const: dict[str, Any] = {name: 1 for name in unit}
    meta = {
        "PLANES": v.bits,
        "GROUP_SIZE": v.group,
        "ACT_ORDER": v.act_order,
        "DOT_F32": False,
        "BLOCK_M": v.block_m,
        "BLOCK_N": v.block_n,
        "BLOCK_K": v.block_k,
    }
    for name, value in meta.items():
        sig[name] = "constexpr"
        const[name] = value
    div16 = [n for n, t in sig.items() if t.startswith("*")] + ["N", "K", "stride_xm", "stride_ym"]
    return bcq_jit._bcq_kernel, sig, const, div16
