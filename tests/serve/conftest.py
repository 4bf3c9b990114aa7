"""Fixtures for serving tests: round-to-nearest GPTQ checkpoints of tiny models, and references.

`write_rtn_checkpoint` writes the same format `python -m tsq_vllm.quantize` writes (docs/format.md)
with per-group asymmetric min-max RTN codes, so the serving path can be tested on its own.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tsq_vllm.format import CheckpointQuantConfig, GPTQLayer, pack_linear

from ..helpers import make_tiny_model

LINEAR_RE = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "serve: starts vLLM engines (about a minute each); select with -m serve"
    )


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, act_order: bool, seed: int = 0):
    """Per-group asymmetric min-max RTN of W [N, K]: codes [N, K], scales/zeros [N, n_g], g_idx [K].

    With act_order the groups are formed over a random column permutation, as GPTQ's desc_act
    does (g_idx[perm[i]] = i // G), so g_idx is not k // G.
    """
    n_out, k_in = w.shape
    qmax = (1 << bits) - 1
    if act_order:
        perm = torch.randperm(k_in, generator=torch.Generator().manual_seed(seed))
    else:
        perm = torch.arange(k_in)
    g_idx = torch.empty(k_in, dtype=torch.int64)
    g_idx[perm] = torch.arange(k_in) // group_size
    wg = w.float()[:, perm].reshape(n_out, -1, group_size)  # [N, n_g, G] in group order
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    scales = ((hi - lo) / qmax).clamp(min=1e-8).half().float()
    zeros = torch.round(-lo / scales).clamp(1, qmax)  # v1 ("gptq") stores z - 1: z >= 1
    g = g_idx  # group of every original column
    codes = torch.round(w.float() / scales[:, g] + zeros[:, g]).clamp(0, qmax).to(torch.int32)
    return codes, scales, zeros.to(torch.int32), g_idx


def write_rtn_checkpoint(
    src: Path,
    dst: Path,
    bits: int,
    group_size: int,
    *,
    act_order: bool = False,
    quant_method: str = "tsq",
) -> Path:
    """Quantize every decoder linear of the model in `src` to a GPTQ checkpoint in `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    state = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not LINEAR_RE.search(name):
            out[name] = t.contiguous()
            continue
        prefix = name[: -len(".weight")]
        # Layers reading the same input (q/k/v, gate/up) share one activation order, as in GPTQ.
        shared_input = re.sub(
            r"\.(q|k|v)_proj$", ".qkv", re.sub(r"\.(gate|up)_proj$", ".gate_up", prefix)
        )
        seed = sum(map(ord, shared_input)) * 7919 % 100003
        codes, scales, zeros, g_idx = rtn_quantize(t, bits, group_size, act_order, seed=seed)
        for key, value in pack_linear(codes, scales, zeros, g_idx, bits).tensors(prefix).items():
            out[key] = value.contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    qcfg = CheckpointQuantConfig(bits=bits, group_size=group_size, desc_act=act_order).to_dict()
    qcfg["quant_method"] = quant_method
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qcfg
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    return dst


def dequantized_state(ckpt: Path, bits: int) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict with every quantized linear decoded by the reference."""
    state = load_file(str(ckpt / "model.safetensors"))
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    fmt, group_size = qc["checkpoint_format"], qc["group_size"]
    out = {}
    for name, t in state.items():
        if name.endswith((".qzeros", ".scales", ".g_idx")):
            continue
        if name.endswith(".qweight"):
            p = name[: -len(".qweight")]
            layer = GPTQLayer(
                t,
                state[f"{p}.qzeros"],
                state[f"{p}.scales"],
                state[f"{p}.g_idx"],
                bits,
                group_size=group_size,
                checkpoint_format=fmt,
            )
            w = layer.dequantize(dtype=torch.float32)
            out[f"{p}.weight"] = w.t().contiguous()
        else:
            out[name] = t
    return out


def reference_greedy(
    src: Path, ckpt: Path, bits: int, prompts: list[list[int]], n_new: int
) -> list[list[int]]:
    """Greedy continuations from transformers (fp32) with the checkpoint's dequantized weights."""
    return reference_greedy_margins(src, ckpt, bits, prompts, n_new)[0]


def reference_greedy_margins(
    src: Path, ckpt: Path, bits: int, prompts: list[list[int]], n_new: int
) -> tuple[list[list[int]], list[list[float]]]:
    """`reference_greedy`'s tokens, and at each step the logit margin between its top two
    candidates (a near-tie, where an engine of lower precision may fairly pick the other)."""
    from transformers import AutoModelForCausalLM

    state = dequantized_state(ckpt, bits)
    # A checkpoint with its own lm_head (quantized from a tied source) is served untied.
    untie = {"tie_word_embeddings": False} if "lm_head.weight" in state else {}
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, **untie).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    outs, margins = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gaps = []
            for _ in range(n_new):
                top = model(ids).logits[0, -1].topk(2)
                gaps.append(float(top.values[0] - top.values[1]))
                ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
            outs.append(ids[0, len(prompt) :].tolist())
            margins.append(gaps)
    return outs, margins


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2", seed=1)
