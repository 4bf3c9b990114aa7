"""vLLM engines on tiny RTN checkpoints: offline LLM, tensor parallel 2, the HTTP server.

Each engine start costs about a minute on CPU, so the offline checks share one worker process
(`llm_worker`) and the whole module starts three vLLM processes. Select with `-m serve`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import dequantized_state, reference_greedy, write_rtn_checkpoint

pytest.importorskip("vllm")
pytestmark = pytest.mark.serve

REPO = Path(__file__).resolve().parents[2]
N_NEW = 16
TEXTS = ["The city of the world was", "He was known for", "School time in the national university"]
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "0|1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def _prompts(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(t)["input_ids"] for t in TEXTS]


def _run_worker(jobs: list[dict], tmp: Path, tp: int = 1, timeout: int = 420) -> list[dict]:
    jobs_file = tmp / f"jobs_tp{tp}.json"
    jobs_file.write_text(json.dumps(jobs))
    log = tmp / f"worker_tp{tp}.log"
    env = {**os.environ, **ENV}
    if tp > 1:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.serve.llm_worker", str(jobs_file), "--tp", str(tp)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=f,
            text=True,
            timeout=timeout,
        )
    results = [
        json.loads(line[len("RESULT ") :])
        for line in proc.stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    assert len(results) == len(jobs), (
        f"worker exit {proc.returncode}; log tail:\n{log.read_text()[-3000:]}"
    )
    return results


def _lm_head_checkpoint(root: Path) -> tuple[Path, Path, int]:
    """A tied tiny model through the real pipeline with --quantize-lm-head."""
    from tests.helpers import make_tiny_model, opts_for
    from tsq_vllm.quantize.run import run_quantization

    src = make_tiny_model(root / "tied-src", "llama", seed=2, tie_word_embeddings=True)
    out = root / "tied-lm-head"
    run_quantization(opts_for(src, out, bits=4, group_size=64, quantize_lm_head=True))
    return src, out, 4


@pytest.fixture(scope="module")
def checkpoints(
    tiny_llama: Path, tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    ck = {
        "llama-2bit-g64-actorder": (
            tiny_llama,
            write_rtn_checkpoint(tiny_llama, root / "l2", 2, 64, act_order=True),
            2,
        ),
        "llama-3bit-g32-actorder": (
            tiny_llama,
            write_rtn_checkpoint(tiny_llama, root / "l3", 3, 32, act_order=True),
            3,
        ),
        # A plain GPTQ checkpoint (quant_method "gptq"), served through --quantization tsq.
        "qwen2-4bit-g128-gptq": (
            tiny_qwen2,
            write_rtn_checkpoint(tiny_qwen2, root / "q4", 4, 128, quant_method="gptq"),
            4,
        ),
        # Tied embeddings, lm_head quantized by the pipeline: served by vLLM's quantized-head path.
        "llama-tied-4bit-g64-lm-head": _lm_head_checkpoint(root),
    }
    return ck


@pytest.fixture(scope="module")
def references(checkpoints: dict) -> dict:
    return {
        name: reference_greedy(src, ck, bits, _prompts(src), N_NEW)
        for name, (src, ck, bits) in checkpoints.items()
    }


def _corrupt(src_ckpt: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src_ckpt, dst)
    edit(dst)
    return dst


def _set_bits(d: Path, bits: int) -> None:
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((d / name).read_text())
        (cfg["quantization_config"] if name == "config.json" else cfg)["bits"] = bits
        (d / name).write_text(json.dumps(cfg))


def _drop_tensor(d: Path, key: str) -> None:
    state = load_file(str(d / "model.safetensors"))
    del state[key]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def offline(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("offline")
    _, l3, _ = checkpoints["llama-3bit-g32-actorder"]
    _, q4, _ = checkpoints["qwen2-4bit-g128-gptq"]
    bad = {
        "bits-mismatch": _corrupt(q4, tmp / "bad_bits", lambda d: _set_bits(d, 3)),
        "missing-tensor": _corrupt(
            l3,
            tmp / "bad_missing",
            lambda d: _drop_tensor(d, "model.layers.1.self_attn.k_proj.scales"),
        ),
    }
    jobs = [
        {"name": n, "model": str(ck), "prompts": _prompts(src), "max_tokens": N_NEW}
        for n, (src, ck, _) in checkpoints.items()
    ]
    jobs.append(
        {
            "name": "bf16",
            "model": str(l3),
            "prompts": _prompts(l3),
            "max_tokens": N_NEW,
            "dtype": "bfloat16",
            "logprobs": True,
        }
    )
    jobs += [
        {"name": n, "model": str(d), "prompts": [[5, 6]], "max_tokens": 1} for n, d in bad.items()
    ]
    results = _run_worker(jobs, tmp)
    return {job["name"]: res for job, res in zip(jobs, results, strict=False)}


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "name",
    [
        "llama-2bit-g64-actorder",
        "llama-3bit-g32-actorder",
        "qwen2-4bit-g128-gptq",
        "llama-tied-4bit-g64-lm-head",
    ],
)
def test_offline_greedy_matches_transformers(offline, references, name):
    assert "error" not in offline[name], offline[name]
    assert offline[name]["tokens"] == references[name]


def test_lm_head_checkpoint_has_a_packed_head_and_its_own_embedding(checkpoints):
    src, ck, _ = checkpoints["llama-tied-4bit-g64-lm-head"]
    state = load_file(str(ck / "model.safetensors"))
    assert {"lm_head.qweight", "lm_head.scales", "model.embed_tokens.weight"} <= set(state)
    assert "lm_head.weight" not in state
    config = json.loads((ck / "config.json").read_text())
    assert config["quantization_config"]["lm_head"] is True
    assert config["tie_word_embeddings"] is False
    assert json.loads((src / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.timeout(900)
def test_bf16_int4_path_logprobs_match_fp32_reference(offline, checkpoints):
    """bf16 serving (the int4 fast path) scores its own greedy tokens like the fp32 reference
    does."""
    from transformers import AutoModelForCausalLM

    src, ck, bits = checkpoints["llama-3bit-g32-actorder"]
    res = offline["bf16"]
    assert "error" not in res, res
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
    model.load_state_dict(dequantized_state(ck, bits), strict=False)
    for prompt, toks, lps in zip(_prompts(src), res["tokens"], res["logprobs"], strict=False):
        ids = torch.tensor([prompt + toks])
        with torch.no_grad():
            logp = model(ids).logits[0].log_softmax(-1)
        ref = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(toks)]
        assert max(abs(a - b) for a, b in zip(lps, ref, strict=False)) < 0.1, (lps, ref)


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "name,needle",
    [
        (
            "bits-mismatch",
            r"\.(qweight|qzeros): checkpoint tensor has shape \(\d+, \d+\), expected .*wrong bits",
        ),
        (
            "missing-tensor",
            r"model\.layers\.1\.self_attn\.k_proj\.scales missing from the checkpoint",
        ),
    ],
)
def test_corrupt_checkpoint_fails_at_load(offline, name, needle):
    assert re.search(needle, offline[name].get("error", "")), offline[name]


@pytest.mark.timeout(900)
def test_tensor_parallel_2_matches_tp1(offline, checkpoints, tmp_path):
    src, ck, _ = checkpoints["llama-3bit-g32-actorder"]
    (res,) = _run_worker(
        [{"model": str(ck), "prompts": _prompts(src), "max_tokens": N_NEW}], tmp_path, tp=2
    )
    assert res.get("tokens") == offline["llama-3bit-g32-actorder"]["tokens"], res


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """`python -m tsq_vllm.serve` on a 4-bit act-order checkpoint; yields (base_url, ckpt, src)."""
    from tsq_vllm.serve.process import ServerProcess

    tmp = tmp_path_factory.mktemp("server")
    ck = write_rtn_checkpoint(tiny_llama, tmp / "l4", 4, 32, act_order=True)
    env = {**os.environ, **ENV}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the async server runs its engine in a child process
    cmd = [
        sys.executable,
        "-m",
        "tsq_vllm.serve",
        str(ck),
        "--host",
        "127.0.0.1",
        "--enforce-eager",
        "--max-model-len",
        "256",
        "--dtype",
        "float32",
        "--max-num-seqs",
        "8",
        "--distributed-executor-backend",
        "uni",
        "--served-model-name",
        "tiny",
    ]
    with ServerProcess(cmd, tmp / "server.log", env=env, cwd=REPO, timeout=400) as srv:
        yield srv.base_url, ck, tiny_llama


def _ids(tokens: list[str]) -> list[int]:
    return [
        int(t.split(":", 1)[1]) for t in tokens
    ]  # "token_id:123" with return_tokens_as_token_ids


@pytest.mark.timeout(900)
def test_http_completions_and_chat_match_transformers(server):
    from openai import OpenAI
    from transformers import AutoTokenizer

    base, ck, src = server
    client = OpenAI(base_url=f"{base}/v1", api_key="none", timeout=120, max_retries=0)
    prompt = _prompts(src)[0]
    tok = AutoTokenizer.from_pretrained(src)
    messages = [{"role": "user", "content": "Tell me about the city."}]
    # Rendered, then tokenized without added special tokens: what vLLM's chat endpoint does.
    chat_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_prompt = tok(chat_text, add_special_tokens=False)["input_ids"]
    ref_completion, ref_chat = reference_greedy(src, ck, 4, [prompt, chat_prompt], 12)

    extra = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    comp = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=1, extra_body=extra
    )
    assert _ids(comp.choices[0].logprobs.tokens) == ref_completion

    chat = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        extra_body=extra,
    )
    assert _ids([c.token for c in chat.choices[0].logprobs.content]) == ref_chat


@pytest.mark.timeout(900)
def test_http_malformed_requests_get_4xx_and_server_keeps_serving(server):
    import urllib.error
    import urllib.request

    base, _, _ = server
    bad_bodies = [
        b'{"model": "tiny", "prompt": "x", "max_tokens": -5}',
        b'{"model": "tiny", "prompt": ',
        b'{"model": "no-such-model", "prompt": "x", "max_tokens": 2}',
        b'{"model": "tiny", "messages": "not a list"}',
    ]
    for i, body in enumerate(bad_bodies):
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        req = urllib.request.Request(
            base + path, data=body, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert 400 <= e.value.code < 500, (i, e.value.code)
    ok = urllib.request.Request(
        base + "/v1/completions",
        data=b'{"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3}',
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(ok, timeout=60) as r:
        assert r.status == 200 and json.loads(r.read())["choices"][0]["text"] is not None
