#!/usr/bin/env bash
# Run every fuzz target for a bounded time and report executions and crashes.
#   scripts/fuzz.sh [seconds per target, default 60]
# Needs cargo-fuzz (cargo install cargo-fuzz). Uses RUSTC_BOOTSTRAP=1 because the sanitizer flags
# are nightly-only and this machine has the stable toolchain alone.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
export RUSTC_BOOTSTRAP=1
status=0
# Seed the GGUF target with the head of a real file when the fixture is fetched.
gguf="${MCOMPRESS_FIXTURES:-$HOME/.cache/mcompress/fixtures}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$gguf" ] && [ ! -f corpus/gguf_header/smollm2-head ]; then
  mkdir -p corpus/gguf_header && head -c 65536 "$gguf" > corpus/gguf_header/smollm2-head
fi
for t in safetensors_header gguf_header recipe packed_layout config_json eval_sets compare; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  if cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$log" 2>&1; then
    result=ok
  else
    result=CRASH; status=1
  fi
  execs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || grep -Eo '#[0-9]+' "$log" | tail -1 | tr -d '#')
  echo "$t: $result, ${execs:-?} executions in ${secs}s, corpus $(ls "corpus/$t" | wc -l) inputs"
  [ "$result" = ok ] || tail -30 "$log"
  rm -f "$log"
done
exit $status
