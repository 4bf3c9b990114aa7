#!/usr/bin/env bash
# GPTQModel 7.7.0 in its own venv (benchmarks/.venv-gptqmodel), for the peer rows of accuracy.py.
# Its metadata asks torch>=2.14.1; it runs on the local torch 2.13.0 CPU build when installed as
# "its requirements without torch, then the package with --no-deps". Never part of the package's deps.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv-gptqmodel
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
"$PIP" install -q torch==2.13.0
echo "torch==2.13.0" > "$VENV/constraints.txt"
# GPTQModel 7.7.0's Requires-Dist (python 3.11), less torch.
"$PIP" install -q -c "$VENV/constraints.txt" \
  'accelerate>=1.15.0' 'numpy>=2.4.6' 'safetensors>=0.8.0' 'filelock>=4.2.4' 'transformers>=5.20.2' \
  'threadpoolctl>=3.7.0' 'packaging>=26.3' 'device-smi>=0.5.7' 'protobuf>=7.36.2' 'pillow>=13.0.0' \
  'requests>=2.34.2' 'pypcre>=0.6.4' 'tokenicer>=0.0.14' 'logbar>=0.4.15' 'jinja2>=3.1.6' \
  'ninja>=1.13.2' 'maturin>=1.15.0' 'datasets>=5.1.0' 'pyarrow>=26.0.0' 'dill>=0.4.1' \
  'torchao>=0.18.0' 'defuser>=0.0.28' gguf
"$PIP" install -q --no-deps gptqmodel==7.7.0
"$VENV/bin/python" -c "import torch, gptqmodel; print('gptqmodel', gptqmodel.__version__, 'torch', torch.__version__)"
