"""vLLM serves BCQ (GPTQT) checkpoints: greedy tokens equal transformers on the decoded weights.

Checkpoints come from `python -m tsq_vllm.quantize --method gptqt` (through `run_quantization`)
on tiny random models; the reference is `tsq_vllm.load_quantized` (the BCQ reference decode) run
greedily in fp32. One worker process starts one engine per checkpoint (about a minute each).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tsq_vllm
from tests.helpers import opts_for
from tsq_vllm.quantize.run import run_quantization

from .test_engine import N_NEW, _prompts, _run_worker

pytest.importorskip("vllm")
pytestmark = pytest.mark.serve


def _greedy(ckpt: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = tsq_vllm.load_quantized(ckpt)
    outs: list[list[int]] = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(N_NEW):
                ids = torch.cat([ids, model(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
            outs.append(ids[0, len(prompt) :].tolist())
    return outs


@pytest.mark.timeout(900)
def test_bcq_greedy_matches_transformers(tiny_llama, tiny_qwen2, tmp_path):
    cases = {
        "llama-k3-g32": (tiny_llama, dict(bits=3, group_size=32)),
        "qwen2-k2-g64-b5-actorder": (
            tiny_qwen2,
            dict(bits=2, group_size=64, intermediate_bits=5, act_order=True),
        ),
    }
    jobs, refs = [], {}
    for name, (src, kw) in cases.items():
        ckpt = run_quantization(opts_for(src, tmp_path / name, method="gptqt", **kw)).output
        prompts = _prompts(src)
        refs[name] = _greedy(ckpt, prompts)
        jobs.append({"model": str(ckpt), "prompts": prompts, "max_tokens": N_NEW})
    # bf16 takes the default CPU path (BCQ converted to int4 codes at load): its greedy tokens
    # are scored by the fp32 reference like it scores them itself.
    jobs.append({**jobs[0], "dtype": "bfloat16", "logprobs": True})
    results = _run_worker(jobs, tmp_path)
    for (name, ref), res in zip(refs.items(), results, strict=False):
        assert "error" not in res, (name, res)
        assert res["tokens"] == ref, name
    bf16 = results[-1]
    assert "error" not in bf16, bf16
    model = tsq_vllm.load_quantized(jobs[0]["model"])
    for prompt, toks, lps in zip(jobs[0]["prompts"], bf16["tokens"], bf16["logprobs"], strict=True):
        with torch.no_grad():
            logp = model(torch.tensor([prompt + toks])).logits[0].log_softmax(-1)
        ref_lp = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(toks)]
        assert max(abs(a - b) for a, b in zip(lps, ref_lp, strict=True)) < 0.1, (lps, ref_lp)
