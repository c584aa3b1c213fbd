#!/usr/bin/env bash
# The real Python clients of our bundles, pinned, in a venv cached outside the tree:
#   ${MCOMPRESS_HF_VENV:-$HOME/.cache/mcompress/hf-venv}
# torch (PyPI's Linux wheel pulls its CUDA libraries: ~5 GB on disk, ~1.5 min the first time;
# the tests run it on the CPU), transformers, compressed-tensors, sentence-transformers.
# Reruns are no-ops. Prints the venv's python on the last line.
#
# Versions are the ones the bundles are tested against; README.md ("Which runtime loads what")
# lists them. Change them together with that table.
set -euo pipefail
VENV="${MCOMPRESS_HF_VENV:-$HOME/.cache/mcompress/hf-venv}"
PINS=(torch==2.15.0 transformers==5.25.0 compressed-tensors==0.20.1 sentence-transformers==6.3.0
  numpy==2.4.6 safetensors==0.8.0)
stamp="$VENV/.mcompress-pins"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${PINS[*]}" ]; then
  echo "$VENV/bin/python"
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
"$VENV/bin/python" -c 'import torch, transformers, compressed_tensors, sentence_transformers' >&2
echo "${PINS[*]}" >"$stamp"
echo "$VENV/bin/python"
