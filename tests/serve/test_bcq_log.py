"""The server log names the CPU path each BCQ layer takes, once per kind of layer."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.kernels.test_bcq import make_bcq
from tsq_vllm.kernels.bcq import prepare_cpu_bcq

pytest.importorskip("vllm")


@pytest.mark.parametrize(
    "b0, dtype", [(4, torch.bfloat16), (5, torch.bfloat16), (4, torch.float32)]
)
def test_the_chosen_cpu_path_is_logged_once(b0, dtype, caplog, monkeypatch):
    import tsq_vllm.kernels.backends as backends
    import tsq_vllm.serve.bcq as serve_bcq

    monkeypatch.setattr(backends, "_logged", set())
    layer = make_bcq(128, 64, 3, 32, b0=b0)
    path = prepare_cpu_bcq(layer, act_dtype=dtype).path
    with caplog.at_level(logging.INFO, logger=backends.__name__):
        for name in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"):
            serve_bcq._log_once(path, layer, dtype, name)
    lines = [r.getMessage() for r in caplog.records if r.name == backends.__name__]
    assert len(lines) == 1  # the second layer of the same kind adds nothing
    assert f"using bcq-{path} backend" in lines[0] and "layers.0" in lines[0]
    assert "3-bit g32 K=128 N=64" in lines[0]
