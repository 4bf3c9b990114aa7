"""The vLLM plugin without an engine: registration, config, real vLLM linear layers under simulated
TP."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from tsq_vllm.format import pack_linear

from .conftest import rtn_quantize

vllm = pytest.importorskip("vllm")

HIDDEN, INTER, HEADS, KV_HEADS, HEAD = 128, 256, 4, 2, 32


@pytest.fixture(scope="module")
def vllm_ctx():
    """A one-process gloo 'distributed' vLLM, enough to build its linear layers."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    from tsq_vllm.serve import register

    register()
    with set_current_vllm_config(VllmConfig()):
        if not model_parallel_is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{port}",
                backend="gloo",
            )
            initialize_model_parallel(1, 1)
        yield


@contextmanager
def fake_tp(rank: int, size: int):
    """Build layers as rank `rank` of `size` (construction and loading only; no collectives run)."""
    import vllm.model_executor.layers.linear as linear_mod
    import vllm.model_executor.layers.vocab_parallel_embedding as vocab_mod
    import vllm.model_executor.parameter as param_mod

    mp = pytest.MonkeyPatch()
    for mod in (linear_mod, param_mod, vocab_mod):
        mp.setattr(mod, "get_tensor_model_parallel_rank", lambda: rank, raising=False)
        mp.setattr(mod, "get_tensor_model_parallel_world_size", lambda: size, raising=False)
    try:
        yield
    finally:
        mp.undo()


def _config(bits: int, group: int, desc_act: bool = False, lm_head: bool = False):
    from tsq_vllm.serve.config import TsqConfig

    cfg = TsqConfig.from_config(
        {
            "quant_method": "tsq",
            "bits": bits,
            "group_size": group,
            "desc_act": desc_act,
            "lm_head": lm_head,
        }
    )
    cfg.packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    return cfg


def _ckpt(n_out: int, k_in: int, bits: int, group: int, act_order: bool, seed: int):
    """Packed tensors and the reference W [K, N] of one random layer."""
    w = torch.randn(n_out, k_in, generator=torch.Generator().manual_seed(seed)) * 0.05
    codes, scales, zeros, g_idx = rtn_quantize(
        w, bits, group, act_order, seed=7
    )  # one order for fused parts
    t = pack_linear(codes, scales, zeros, g_idx, bits)
    return t, t.dequantize(dtype=torch.float32)


def _build(kind: str, cfg, dtype: torch.dtype):
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    if kind == "qkv":
        return QKVParallelLinear(
            HIDDEN,
            HEAD,
            HEADS,
            KV_HEADS,
            bias=False,
            quant_config=cfg,
            params_dtype=dtype,
            prefix="model.layers.0.self_attn.qkv_proj",
        )
    if kind == "gate_up":
        return MergedColumnParallelLinear(
            HIDDEN,
            [INTER, INTER],
            bias=False,
            quant_config=cfg,
            params_dtype=dtype,
            prefix="model.layers.0.mlp.gate_up_proj",
        )
    return RowParallelLinear(
        INTER,
        HIDDEN,
        bias=False,
        quant_config=cfg,
        params_dtype=dtype,
        prefix="model.layers.0.mlp.down_proj",
    )


PARTS = {
    "qkv": [("q", HEADS * HEAD), ("k", KV_HEADS * HEAD), ("v", KV_HEADS * HEAD)],
    "gate_up": [(0, INTER), (1, INTER)],
    "down": [(None, HIDDEN)],
}


def _load(layer, parts_tensors) -> None:
    for shard, t in parts_tensors:
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            param = getattr(layer, name)
            if shard is None:
                param.weight_loader(param, getattr(t, name))
            else:
                param.weight_loader(param, getattr(t, name), shard)


def _run_tp(kind: str, bits: int, group: int, tp: int, act_order: bool, dtype: torch.dtype):
    """Per-rank outputs of a real vLLM layer under TP `tp`, and the full reference output."""
    k_in = INTER if kind == "down" else HIDDEN
    ckpts = [
        (shard, *_ckpt(n, k_in, bits, group, act_order, seed=i))
        for i, (shard, n) in enumerate(PARTS[kind])
    ]
    x = torch.randn(3, k_in, generator=torch.Generator().manual_seed(5)).to(dtype)
    refs = [x.float() @ w for _, _, w in ckpts]
    outs = []
    for rank in range(tp):
        with fake_tp(rank, tp):
            layer = _build(kind, _config(bits, group, act_order), dtype)
            _load(layer, [(s, t) for s, t, _ in ckpts])
            layer.quant_method.process_weights_after_loading(layer)
            x_local = x[:, rank * k_in // tp : (rank + 1) * k_in // tp] if kind == "down" else x
            outs.append(layer.quant_method.apply(layer, x_local).float())
    if kind == "down":
        return sum(outs), refs[0]
    # Column-parallel: rank r holds slice r of every part (k/v replicated when tp > kv heads).
    expected = []
    for rank in range(tp):
        pieces = []
        for (shard, n), ref in zip(PARTS[kind], refs, strict=False):
            reps = max(1, tp // KV_HEADS) if shard in ("k", "v") else 1
            width = n * reps // tp
            start = (rank // reps) * width
            pieces.append(ref[:, start : start + width])
        expected.append(torch.cat(pieces, dim=1))
    return torch.cat(outs, dim=1), torch.cat(expected, dim=1)


@pytest.mark.parametrize("kind", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize(
    "bits,group,tp,act_order",
    [
        (3, 32, 1, False),
        (3, 32, 2, False),
        (3, 32, 4, True),
        (2, 64, 2, True),
        (4, 32, 2, False),
        (8, 64, 2, True),
        (4, 128, 1, True),
    ],
)
def test_tensor_parallel_shards_match_reference(vllm_ctx, kind, bits, group, tp, act_order):
    got, ref = _run_tp(kind, bits, group, tp, act_order, torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bf16_layers_use_the_int4_path(vllm_ctx, bits):
    got, ref = _run_tp("qkv", bits, 64, 2, True, torch.bfloat16)
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.02)


def test_too_large_tensor_parallel_size_says_so(vllm_ctx):
    with (
        fake_tp(0, 4),
        pytest.raises(ValueError, match="tensor-parallel size 4 splits in_features=128"),
    ):
        from vllm.model_executor.layers.linear import RowParallelLinear

        RowParallelLinear(HIDDEN, HIDDEN, bias=False, quant_config=_config(4, 64), prefix="o_proj")
    with (
        fake_tp(0, 16),
        pytest.raises(ValueError, match="tensor-parallel size 16 .* not a multiple of 32"),
    ):
        _build("gate_up", _config(3, 32), torch.float32)


def test_mismatched_checkpoint_is_refused_with_a_clear_message(vllm_ctx):
    layer = _build("down", _config(3, 32), torch.float32)
    four_bit, _ = _ckpt(HIDDEN, INTER, 4, 32, False, seed=0)
    with pytest.raises(
        ValueError, match=r"down_proj\.qweight: .*shape \(32, 128\), expected \(24, 128\).*bits"
    ):
        layer.qweight.weight_loader(layer.qweight, four_bit.qweight)
    with pytest.raises(ValueError, match="dtype torch.float32, expected int32"):
        layer.qweight.weight_loader(layer.qweight, torch.zeros(24, 128))
    with pytest.raises(ValueError, match=r"scales: .*shape \(4, 128\), expected \(8, 128\)"):
        layer.scales.weight_loader(layer.scales, torch.zeros(4, 128))


def test_missing_fused_part_is_named(vllm_ctx):
    layer = _build("qkv", _config(4, 32), torch.float32)
    parts = [
        (s, _ckpt(n, HIDDEN, 4, 32, False, seed=i)[0]) for i, (s, n) in enumerate(PARTS["qkv"])
    ]
    _load(layer, parts[:1] + parts[2:])  # no k_proj
    with pytest.raises(ValueError, match=r"self_attn\.k_proj\.qweight missing from the checkpoint"):
        layer.quant_method.process_weights_after_loading(layer)


def test_fused_parts_need_one_activation_order(vllm_ctx):
    layer = _build("gate_up", _config(4, 32, desc_act=True), torch.float32)
    gate = _ckpt(INTER, HIDDEN, 4, 32, True, seed=0)[0]
    up = pack_linear(*rtn_quantize(torch.randn(INTER, HIDDEN), 4, 32, True, seed=99), 4)
    _load(layer, [(0, gate)])
    with pytest.raises(ValueError, match="g_idx differs from the other shards"):
        layer.g_idx.weight_loader(layer.g_idx, up.g_idx, 1)


def test_config_and_override(vllm_ctx):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization import get_quantization_config

    from tsq_vllm.serve import register
    from tsq_vllm.serve.config import TsqConfig

    register()  # twice in one process is fine
    assert get_quantization_config("tsq") is TsqConfig
    over = TsqConfig.override_quantization_method
    assert over({"quant_method": "tsq"}, None) == "tsq"
    assert over({"quant_method": "gptq", "bits": 3}, "tsq") == "tsq"
    assert over({"quant_method": "gptq", "bits": 4}, None) is None  # plain GPTQ stays with vLLM
    assert over({"quant_method": "awq"}, "tsq") is None
    assert TsqConfig.get_checkpoint_weight_mapper().map_name("m.q_proj.g_idx") == "m.q_proj.g_idx"
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        TsqConfig.from_config({"quant_method": "gptq", "bits": 5, "group_size": 64})
    assert TsqConfig.from_config(
        {"quant_method": "tsq", "bits": 4, "group_size": 64, "lm_head": True}
    ).spec.lm_head
    cfg = _config(4, 64)
    cfg.quantized_modules = {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"}
    layer = _build("down", _config(4, 64), torch.float32)
    assert isinstance(
        cfg.get_quant_method(layer, "model.layers.0.mlp.down_proj"), UnquantizedLinearMethod
    )
    assert (
        cfg.get_quant_method(layer, "model.layers.0.mlp.gate_up_proj").__class__.__name__
        == "TsqLinearMethod"
    )
    assert cfg.get_quant_method(torch.nn.Embedding(4, 4), "lm_head") is None


def test_serve_imports_without_vllm():
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import tsq_vllm.serve, tsq_vllm.serve.__main__ as m\n"
        "assert m.server_argv('d', ['--port', '1'])[-2:] == ['--quantization', 'tsq']\n"
        "assert m.server_argv('d', ['--quantization=gptq']).count('--quantization') == 0\n"
        "try:\n    tsq_vllm.serve.register()\nexcept ImportError:\n    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize(
    "setup,needle",
    [
        (lambda d: None, "does not exist"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "not a tsq/GPTQ checkpoint"),
        (
            lambda d: (
                d.mkdir(),
                (d / "config.json").write_text('{"quantization_config": {"quant_method": "awq"}}'),
            ),
            "quant_method='awq'",
        ),
    ],
)
def test_launcher_refuses_bad_dirs_in_one_line(tmp_path, setup, needle):
    d = tmp_path / "model"
    setup(d)
    out = subprocess.run(
        [sys.executable, "-m", "tsq_vllm.serve", str(d), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and needle in out.stderr, out.stderr


@pytest.mark.parametrize("kind,act_order", [("qkv", True), ("down", False), ("down", True)])
def test_kernel_path_glue(vllm_ctx, monkeypatch, kind, act_order):
    """The non-CPU branch (tsq::dequant_matmul, Triton on CUDA) wired up, run here on CPU
    tensors."""
    from tsq_vllm.kernels.backends import TritonBackend

    monkeypatch.setattr(TritonBackend, "can_implement", classmethod(lambda cls, t, d: (True, None)))
    got, ref = _run_tp(kind, 3, 32, 2, act_order, torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "corrupt,needle",
    [
        (
            lambda t: t.scales.index_fill_(1, torch.tensor([5]), float("nan")),
            "scales has 4 NaN/inf value(s)",
        ),
        (lambda t: t.scales.fill_(float("inf")), "scales has 512 NaN/inf value(s)"),
        (lambda t: t.qzeros.fill_(-1), "qzeros decodes to zero points in [16, 16]"),
    ],
)
def test_non_finite_or_out_of_range_tensors_are_refused_after_loading(vllm_ctx, corrupt, needle):
    """A NaN scale would otherwise serve empty text with status 200."""
    layer = _build("down", _config(4, 64), torch.float32)
    t, _ = _ckpt(HIDDEN, INTER, 4, 64, False, seed=0)
    corrupt(t)
    _load(layer, [(None, t)])
    with pytest.raises(ValueError, match=re.escape(f"model.layers.0.mlp.down_proj.{needle}")):
        layer.quant_method.process_weights_after_loading(layer)


def test_plugin_config_refuses_a_flipped_checkpoint_format():
    from tsq_vllm.serve.config import TsqConfig

    fp = {"checkpoint_format": "gptq", "bits": 4, "group_size": 64, "sym": False, "files": {}}
    raw = {"quant_method": "tsq", "bits": 4, "group_size": 64, "tsq": {"integrity": fp}}
    assert TsqConfig.from_config(raw).spec.checkpoint_format == "gptq"
    with pytest.raises(
        ValueError, match="checkpoint_format='gptq_v2' differs from checkpoint_format='gptq'"
    ):
        TsqConfig.from_config({**raw, "checkpoint_format": "gptq_v2"})
