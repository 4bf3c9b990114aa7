"""The quantization math on the compute device: every tensor of `quantize_weight` and of the
Hessian accumulation stays on the device it was given (CUDA when present; cpu always), the packed
result comes back on CPU, and float32 precision stays close to float64."""

from __future__ import annotations

import pytest
import torch

from tsq_vllm.core import HessianAccumulator, layer_objective
from tsq_vllm.quantize import LayerScheme, quantize_weight

from ..core.conftest import correlated_inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SCHEMES = {
    "both-stages-r": dict(bits=3, group_size=32),
    "plain-gptq": dict(bits=4, group_size=64, stage1=False, stage2=False),
    "act-order-mse": dict(bits=2, group_size=32, act_order=True, stage1=False, scale_search="mse"),
}


def _layer(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    X = correlated_inputs(128, 1024, seed=seed)
    X_fp = X + 0.05 * torch.randn(X.shape, generator=g)
    W = torch.randn(64, 128, generator=g)
    acc = HessianAccumulator(128, with_r=True)
    for b in range(0, X.shape[0], 256):
        acc.add(X[b : b + 256], X_fp[b : b + 256])
    H, R = acc.finalize()
    return W, H, R, acc.finalize_delta(), (X, X_fp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_the_math_runs_on_the_given_device_and_matches_cpu(device, name):
    W, H, R, D, _ = _layer()
    scheme = LayerScheme(**SCHEMES[name])
    ref = quantize_weight(W, H, scheme, R=R, D=D)
    dev = torch.device(device)
    qw = quantize_weight(W.to(dev), H.to(dev), scheme, R=R.to(dev), D=D.to(dev))
    for t in (qw.codes, qw.scales, qw.zeros, qw.g_idx):
        assert t.device.type == dev.type
    packed = qw.to_gptq()
    assert packed.qweight.device.type == "cpu" and packed.scales.device.type == "cpu"
    agree = float((qw.codes.cpu() == ref.codes).float().mean())
    if dev.type == "cpu":
        assert agree == 1.0 and torch.equal(qw.scales, ref.scales)
    else:  # other kernels, other rounding: nearly the same codes and loss
        assert agree > 0.99 and abs(qw.stats["loss"] - ref.stats["loss"]) <= 0.01 * abs(
            ref.stats["loss"]
        )


@pytest.mark.parametrize("device", DEVICES)
def test_accumulation_stays_on_the_device_in_the_asked_dtype(device):
    _, _, _, _, (X, X_fp) = _layer()
    ref = HessianAccumulator(128, with_r=True)
    ref.add(X, X_fp)
    for dtype in (torch.float64, torch.float32):
        acc = HessianAccumulator(128, with_r=True, device=device, dtype=dtype)
        for b in range(0, X.shape[0], 100):
            acc.add(X[b : b + 100].to(device), X_fp[b : b + 100].to(device))
        H, R = acc.finalize()
        assert acc.H.dtype == dtype and H.device.type == torch.device(device).type
        torch.testing.assert_close(H.cpu(), ref.finalize()[0], rtol=1e-4, atol=1e-5)
        assert R is not None


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_float32_precision_is_close_to_float64(name):
    """An independent oracle for the loss: (q − w)ᵀ H (q − w) in float64 from the decode."""
    W, H, R, D, _ = _layer(seed=7)
    losses, codes = {}, {}
    for precision in ("float64", "float32"):
        qw = quantize_weight(W, H, LayerScheme(**SCHEMES[name], precision=precision), R=R, D=D)
        losses[precision] = layer_objective(W, qw.dequantize(), H, None)
        codes[precision] = qw.codes
    agree = float((codes["float32"] == codes["float64"]).float().mean())
    assert agree > 0.98, agree
    assert abs(losses["float32"] - losses["float64"]) <= 0.02 * losses["float64"]
