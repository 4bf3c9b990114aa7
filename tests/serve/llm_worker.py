"""Run vLLM's offline `LLM` on checkpoints and print one JSON result line per job.

Started as a subprocess by the tests so engines live and die outside pytest; one process runs
several jobs in turn because importing vLLM costs most of an engine start:

  python -m tests.serve.llm_worker JOBS_JSON_FILE [--tp N]

Each job: {"model": dir, "prompts": [[ids]], "max_tokens": n, "dtype": "float32", "logprobs": bool,
"quantization": "tsq"} ("quantization" is what vLLM is asked for; "tsq" when absent).
Each result line: "RESULT {"tokens": [[ids]], "logprobs": [[lp]], "quantization": method}" (the
method vLLM resolved it to) or "RESULT {"error": "..."}".
"""

from __future__ import annotations

import argparse
import gc
import json


def run_job(job: dict, tp: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=job["model"],
        quantization=job.get("quantization", "tsq"),
        dtype=job.get("dtype", "float32"),
        tensor_parallel_size=tp,
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=8,
        max_num_batched_tokens=256,
        seed=0,
        # One process for TP 1: no separate worker to spawn and import vLLM into.
        distributed_executor_backend="uni" if tp == 1 else "mp",
    )
    params = SamplingParams(
        temperature=0.0,
        max_tokens=job["max_tokens"],
        ignore_eos=True,
        logprobs=0 if job.get("logprobs") else None,
    )
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False
    )
    result: dict = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "quantization": llm.llm_engine.vllm_config.model_config.quantization,
    }
    if job.get("logprobs"):
        result["logprobs"] = [
            [
                step[tok].logprob
                for step, tok in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=False)
            ]
            for o in outs
        ]
    del llm, outs
    gc.collect()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jobs", help="JSON file with a list of jobs")
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()
    with open(args.jobs) as f:
        jobs = json.load(f)
    for job in jobs:
        try:
            result = run_job(job, args.tp)
        except Exception as e:  # the tests assert on load failures' messages
            result = {"error": f"{type(e).__name__}: {e}"}
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
