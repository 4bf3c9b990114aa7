#!/bin/bash
# kill -9 a SmolLM2 quantization after some decoder layers, --resume it, and compare its files
# byte for byte with an uninterrupted run of the same command.
#
#   bash benchmarks/resume_smollm2.sh [WORKDIR] [LAYERS_BEFORE_KILL]
#
# Run it pinned like any heavy job (one core, one torch thread). Prints one CMP line per file.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
W=${1:-/tmp/tsq-resume-smollm2}
K=${2:-10}
ARGS=(--model smollm2 --nsamples 4 --seqlen 64)
mkdir -p "$W"
rm -rf "$W/whole" "$W/resumed" "$W"/.resumed.*
echo "start $(date -u +%T)"
$PY -m tsq_vllm.quantize "${ARGS[@]}" --output "$W/whole" > "$W/whole.log" 2>&1
echo "uninterrupted rc=$? $(date -u +%T): $(tail -1 "$W/whole.log")"
$PY -m tsq_vllm.quantize "${ARGS[@]}" --output "$W/resumed" > "$W/killed.log" 2>&1 &
pid=$!
n=0
while kill -0 $pid 2>/dev/null; do
  n=$(cat "$W"/.resumed.*/tsq_journal.json 2>/dev/null | grep -c '"index"')
  [ "${n:-0}" -ge "$K" ] && break
  sleep 0.2
done
kill -9 $pid
wait $pid
echo "killed (status $?) with $n decoder layers in the journal $(date -u +%T)"
ls -a "$W" | grep resumed
$PY -m tsq_vllm.quantize "${ARGS[@]}" --output "$W/resumed" --resume > "$W/resume.log" 2>&1
echo "resume rc=$? $(date -u +%T): $(tail -1 "$W/resume.log")"
for f in $(ls "$W/whole"); do
  if cmp -s "$W/whole/$f" "$W/resumed/$f"; then echo "CMP $f identical"; else echo "CMP $f DIFFERS"; fi
done
ls -a "$W" | grep resumed
