"""The kernel test matrix on a real GPU: `python -m tests.kernels.cuda_check` (needs CUDA).

Run by test_cuda.py in a subprocess without TRITON_INTERPRET, so the kernels are compiled for the
device; skipped where no GPU exists (the development machines).
"""

import itertools
import sys

import torch

from tsq_vllm.kernels import dequant_matmul, dequant_matmul_op, register_op
from tsq_vllm.kernels import triton_kernels as tk
from tsq_vllm.kernels.reference import Problem

from .layers import activations, check_close, make_layer


def _launch(x, layer, kind, **kw):
    g = layer.on("cuda")
    p = Problem(x.shape[0], g.K, g.N, g.n_groups, g.group_size)
    cfg = kw.pop("config", None) or tk.pick_config(p, g.g_idx is not None, kind, sm_count=132)
    out = torch.full((x.shape[0], g.N), float("nan"), dtype=x.dtype, device="cuda")
    y = tk.launch(x.cuda(), g, config=cfg, out=out, **kw)
    torch.cuda.synchronize()
    return y.cpu()


def main() -> int:
    assert torch.cuda.is_available() and not tk.is_interpreted()
    cases = 0
    for kind, bits, group, dtype, act in itertools.product(
        ["gemm", "gemv"],
        [2, 3, 4, 8],
        [32, 64, 128],
        [torch.float16, torch.bfloat16],
        [False, True],
    ):
        layer = make_layer(512, 160, bits, group, act_order=act, seed=bits * 7 + group)
        for M in [1, 3, 16] if kind == "gemv" else [17, 64, 130]:
            x = activations(M, 512, dtype, seed=M)
            check_close(_launch(x, layer, kind), x, layer)
            cases += 1
    # a real layer shape, split-K and both GEMM classes
    layer = make_layer(4096, 4096, 3, 64, seed=1)
    for M in (1, 16, 64, 256):
        x = activations(M, 4096, torch.float16, seed=M)
        check_close(_launch(x, layer, "gemv" if M <= 16 else "gemm"), x, layer)
        cases += 1
    # autotuned path, entry point, custom op under torch.compile
    for M in (2, 100):
        x = activations(M, 4096, torch.bfloat16, seed=M)
        check_close(_launch(x, layer, "gemv" if M <= 16 else "gemm", autotune=True), x, layer)
        g = layer.on("cuda")
        check_close(dequant_matmul(x.cuda(), g).cpu(), x, layer)
        register_op()
        f = torch.compile(lambda v, g=g: dequant_matmul_op(v, g), fullgraph=True)
        check_close(f(x.cuda()).cpu(), x, layer)
        cases += 3
    print(f"cuda_check: {cases} cases OK on {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
