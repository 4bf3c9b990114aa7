#!/usr/bin/env bash
# AutoRound (Intel's `auto-round` from PyPI) in its own venv (benchmarks/.venv-autoround), for the
# AutoRound peer rows of accuracy.py. torch is pinned to the local 2.13.0 CPU build through a
# constraints file, so resolving auto-round's requirements can never replace it. Never part of the
# package's deps.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv-autoround
AUTOROUND_VERSION="${AUTOROUND_VERSION:-0.16.1}"
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
"$PIP" install -q torch==2.13.0
echo "torch==2.13.0" > "$VENV/constraints.txt"
# auto-round's Requires-Dist; transformers>=5 like the GPTQModel venv (the same fp32 HF export
# loads in both).
"$PIP" install -q -c "$VENV/constraints.txt" accelerate datasets numpy py-cpuinfo tqdm \
  'transformers>=4.38' pydantic requests safetensors
"$PIP" install -q -c "$VENV/constraints.txt" --no-deps "auto-round==$AUTOROUND_VERSION"
"$VENV/bin/python" -c "import torch, auto_round; print('auto-round', auto_round.__version__, 'torch', torch.__version__)"
