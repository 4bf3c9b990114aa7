"""Triton kernels (interpreted, CPU) against the fp32 reference decode.

Every output buffer is poisoned with NaN before the launch, so a tile the kernel never writes
fails `check_close`.
"""

import pytest
import torch

from tsq_vllm.kernels import dequant_matmul
from tsq_vllm.kernels.reference import Problem

from .layers import activations, check_close, make_layer

DTYPES = (torch.float16, torch.bfloat16)
K, N = 256, 96  # N = 1.5 blocks of 64; K = 2 groups of 128


def run(tk, x, layer, kind, *, config=None, workspace=None, autotune=False):
    g = layer.gptq
    if config is None:
        p = Problem(x.shape[0], g.K, g.N, g.n_groups, g.group_size)
        config = tk.pick_config(p, g.g_idx is not None, kind, sm_count=8)
    out = torch.full((x.shape[0], g.N), float("nan"), dtype=x.dtype)
    y = tk.launch(x, g, config=config, out=out, workspace=workspace, autotune=autotune)
    assert y is out
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["gemm", "gemv"])
def test_all_widths_groups_dtypes(tk, kind, bits, group, dtype):
    layer = make_layer(K, N, bits, group, seed=bits * 1000 + group)
    x = activations(33 if kind == "gemm" else 3, K, dtype)
    check_close(run(tk, x, layer, kind), x, layer)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["gemm", "gemv"])
def test_act_order(tk, kind, bits, dtype):
    layer = make_layer(K, N, bits, 32, act_order=True, seed=bits)
    x = activations(17 if kind == "gemm" else 5, K, dtype)
    check_close(run(tk, x, layer, kind), x, layer)


@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "act"])
@pytest.mark.parametrize(
    "kind,M", [("gemm", m) for m in (1, 3, 16, 17, 33)] + [("gemv", m) for m in (1, 3, 16)]
)
def test_batch_sizes(tk, kind, M, act_order):
    layer = make_layer(K, N, 3, 64, act_order=act_order, seed=M)
    x = activations(M, K, torch.float16 if M % 2 else torch.bfloat16, seed=M)
    check_close(run(tk, x, layer, kind), x, layer)


@pytest.mark.parametrize("bits,n", [(4, 40), (8, 100), (2, 48)])
@pytest.mark.parametrize("kind", ["gemm", "gemv"])
def test_awkward_n(tk, kind, bits, n):
    """N smaller than one block, or not a multiple of it; K with a single group of 128."""
    layer = make_layer(128, n, bits, 128, seed=n)
    x = activations(9, 128, torch.float16)
    check_close(run(tk, x, layer, kind), x, layer)


def test_large_prefill_config(tk):
    """The 128×128 GEMM tile class that M > 64 selects, with M and N partial tiles."""
    layer = make_layer(128, 160, 3, 64, seed=7)
    x = activations(70, 128, torch.bfloat16)
    cfg = tk.pick_config(Problem(70, 128, 160, 2, 64), False)
    assert (cfg.kind, cfg.block_m, cfg.block_n) == ("gemm", 128, 128)
    check_close(run(tk, x, layer, "gemm", config=cfg), x, layer)


@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "act"])
@pytest.mark.parametrize("split_k", [3, 8])
def test_split_k_workspace(tk, split_k, act_order):
    """Split-K with an uneven last split; the workspace is poisoned too."""
    layer = make_layer(K, N, 3, 32, act_order=act_order, seed=split_k)
    x = activations(4, K, torch.float16)
    cfg = tk.KernelConfig("gemv", 16, 64, 32, split_k=split_k)
    _, splits = tk.split_plan(K, 32, split_k)
    assert splits == split_k
    ws = torch.full((splits, 4, N), float("nan"))
    check_close(run(tk, x, layer, "gemv", config=cfg, workspace=ws), x, layer)
    assert torch.isfinite(ws).all()


def test_gptq_v2_zero_points(tk):
    """v2 stores z as is, so z = 0 is representable."""
    layer = make_layer(K, N, 4, 64, fmt="gptq_v2", seed=3)
    x = activations(6, K, torch.float16)
    for kind in ("gemm", "gemv"):
        check_close(run(tk, x, layer, kind), x, layer)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["gemm", "gemv"])
def test_one_hot_rows_decode_exactly(tk, kind, bits):
    """x = one-hot rows picks single rows of W: bit-exact against the reference decode, including
    the 3-bit values that straddle words (k = 10, 21 of each 32-run) and the run after."""
    ks = [0, 9, 10, 11, 20, 21, 22, 31, 32, 42, 53, 63, 64, 127]
    layer = make_layer(128, 64, bits, 32, seed=bits)
    x = torch.zeros(len(ks), 128, dtype=torch.float16)
    x[torch.arange(len(ks)), torch.tensor(ks)] = 1
    y = run(tk, x, layer, kind)
    w = layer.weight()
    assert torch.equal(y, w[ks].to(torch.float16))


def test_entry_point_batch_dims(tk):
    """dequant_matmul with backend='triton' on CPU (interpreted) and leading batch dims."""
    layer = make_layer(128, 64, 3, 32, seed=11)
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    y = dequant_matmul(x, layer.gptq, backend="triton")
    ref = dequant_matmul(x, layer.gptq, backend="torch")
    assert y.shape == (2, 3, 64)
    check_close(y.reshape(6, 64), x.reshape(6, 128), layer)
    assert (y.float() - ref.float()).abs().max() <= 1.2e-2 * ref.float().abs().max()
    # the checkpoint's stored sequential g_idx takes the act-order path and agrees
    y_stored = dequant_matmul(x, layer.stored, backend="triton")
    assert (y_stored.float() - y.float()).abs().max() <= 1.2e-2 * ref.float().abs().max()


def test_triton_rejects_fp32_activations(tk):
    layer = make_layer(128, 64, 4, 32)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        dequant_matmul(torch.randn(2, 128), layer.gptq, backend="triton")


@pytest.mark.parametrize("kind,M", [("gemm", 20), ("gemv", 2)])
def test_autotune_path_with_cpu_timer(tk, kind, M):
    """The opt-in autotuner (GPU) path, run here with the CPU timer: pruning, grid and split
    planning must give a correct result whichever config wins."""
    layer = make_layer(128, 64, 3, 32, seed=5)
    x = activations(M, 128, torch.float16)
    check_close(run(tk, x, layer, kind, autotune=True), x, layer)
