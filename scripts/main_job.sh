#!/usr/bin/env bash
# The main job on the embedded default model, end to end on CPU:
#   quantize SmolLM2-135M to INT3 g64 with both stages -> perplexity of FP and INT3 ->
#   serve the INT3 checkpoint with vLLM (CPU) -> one chat answer through the OpenAI client.
# Expects .venv from scripts/setup_venv.sh. Outputs go to runs/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
out=runs/smollm2-tsq-int3-g64
mkdir -p runs

$py -m tsq_vllm.quantize --model smollm2 --bits 3 --group-size 64 \
    --calib wiki --nsamples 32 --seqlen 256 --seed 0 --output "$out" --overwrite
$py -m tsq_vllm.eval --model smollm2 --max-tokens 4096 --seqlen 512 --output-json runs/ppl-fp.json
$py -m tsq_vllm.eval --model "$out" --max-tokens 4096 --seqlen 512 --output-json runs/ppl-int3.json
$py - <<'PY'
import json
fp, q = (json.load(open(f"runs/ppl-{n}.json")) for n in ("fp", "int3"))
print("\n| model | wiki test perplexity | tokens |\n|---|---:|---:|")
for name, r in (("SmolLM2-135M FP", fp), ("tsq INT3 g64", q)):
    print(f"| {name} | {r['ppl']:.3f} | {r['tokens']} |")
PY

port=8765
$py -m tsq_vllm.serve "$out" --host 127.0.0.1 --port $port --enforce-eager \
    --max-model-len 512 --dtype bfloat16 > runs/serve.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
$py scripts/chat_once.py --port $port --question "What is the capital of France?" \
    || { tail -n 40 runs/serve.log; exit 1; }
