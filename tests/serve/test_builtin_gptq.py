"""vLLM's own `gptq` method serves a 4-bit symmetric checkpoint written by `tsq_vllm.quantize`.

The GPTQ-compatibility promise: a tsq checkpoint relabelled `quant_method: "gptq"` (nothing else
changed) is served by vLLM's built-in GPTQ path, not the tsq plugin, with the greedy tokens
transformers produces (fp32) on the checkpoint's dequantized weights, up to the first near-tie.
vLLM's GPTQ path takes 4/8-bit symmetric weights and fp16/bf16 activations only: the engine runs
fp16, so where fp32's top two logits lie within 0.01 (this tiny random model has such steps: one
of 0.0009 after 8 tokens) it may fairly pick the other token; every token before that must agree,
and a divergence anywhere else fails. On CPU
it runs vLLM's WNA16 kernel, which ships in its AVX-512 build, so the test is skipped on other
hosts. One engine start (about a minute).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ..helpers import opts_for
from .conftest import reference_greedy_margins
from .test_engine import N_NEW, _prompts, _run_worker

pytest.importorskip("vllm")
pytestmark = [
    pytest.mark.serve,
    pytest.mark.skipif(
        not torch.cpu._is_avx512_supported(),
        reason="vLLM's CPU GPTQ path (its WNA16 kernel) needs an AVX-512 host",
    ),
]


def _as_gptq(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((dst / name).read_text())
        (cfg["quantization_config"] if name == "config.json" else cfg)["quant_method"] = "gptq"
        (dst / name).write_text(json.dumps(cfg))
    return dst


@pytest.mark.timeout(900)
@pytest.mark.parametrize("group_size", [64])
def test_vllm_gptq_serves_tsq_sym4_checkpoint(tiny_llama: Path, tmp_path: Path, group_size: int):
    from tsq_vllm.quantize.run import run_quantization

    opts = opts_for(tiny_llama, tmp_path / "tsq", bits=4, sym=True, group_size=group_size)
    run_quantization(opts, progress=False)
    ck = _as_gptq(tmp_path / "tsq", tmp_path / "gptq")
    prompts = _prompts(tiny_llama)
    (res,) = _run_worker(
        [
            {
                "model": str(ck),
                "prompts": prompts,
                "max_tokens": N_NEW,
                "dtype": "float16",
                "quantization": "gptq",
            }
        ],
        tmp_path,
    )
    assert "error" not in res, res
    # vLLM resolves `--quantization gptq` on a GPTQ checkpoint to its GPTQ method, not tsq.
    assert res["quantization"] in ("gptq", "auto_gptq", "gptq_marlin"), res["quantization"]
    want, margins = reference_greedy_margins(tiny_llama, ck, 4, prompts, N_NEW)
    for got, ref, gap in zip(res["tokens"], want, margins, strict=True):
        first = next((i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b), None)
        if first is not None:
            assert gap[first] < NEAR_TIE, (first, gap[first], got, ref)


NEAR_TIE = 0.01  # logits: fp16's rounding of this model's logits is ~1e-3
