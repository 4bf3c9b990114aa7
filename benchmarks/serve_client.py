"""The client side of benchmarks/serve_bench.py: streamed completions, rounds, server memory.

Server-agnostic: vLLM's OpenAI server and llama.cpp's `llama-server` are measured by the same
code, through the ordinary `openai` client.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from tsq_vllm.serve.process import ServerProcess

__all__ = ["measure", "memory_mib"]


def memory_mib(pid: int) -> dict[str, float]:
    """PSS and RSS summed over process `pid` and every descendant (vLLM's engine core, workers)."""
    import psutil

    root = psutil.Process(pid)
    pss = rss = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        pss, rss = pss + info.pss, rss + info.rss
    return {"pss_mib": pss / 2**20, "rss_mib": rss / 2**20}


def _one_request(client, model: str, max_tokens: int, prompt: str) -> dict:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": ttft, "tokens": tokens, "seconds": time.perf_counter() - t0}


def measure(
    server: ServerProcess, streams: list[int], repeats: int, max_tokens: int, prompt: str
) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none", timeout=600)
    model = client.models.list().data[0].id
    _one_request(client, model, max_tokens, prompt)  # warm-up
    out = {}
    for n in streams:
        rounds, ttfts = [], []
        with ThreadPoolExecutor(n) as pool:
            for _ in range(repeats):
                t = time.perf_counter()
                reqs = list(
                    pool.map(lambda _: _one_request(client, model, max_tokens, prompt), range(n))
                )
                wall = time.perf_counter() - t
                if any(r["tokens"] != max_tokens for r in reqs):
                    raise SystemExit(
                        f"a request returned {[r['tokens'] for r in reqs]} tokens, not {max_tokens}"
                    )
                rounds.append(sum(r["tokens"] for r in reqs) / wall)
                ttfts += [r["ttft"] for r in reqs]
        out[n] = {
            "tok_s": statistics.median(rounds),
            "tok_s_rounds": rounds,
            "ttft_s": statistics.median(ttfts),
        }
    return out
