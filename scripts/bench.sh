#!/usr/bin/env bash
# Streaming quantization benchmark on a synthetic 1.1B-parameter BF16 model in TinyLlama shapes
# (hidden 2048, intermediate 5632, 22 layers, vocab 32000; 2.2 GB), generated on first use by
# scripts/gen_synthetic.py into ~/.cache/mcompress/bench. Not a test: prints figures and ratios.
#
#   scripts/bench.sh [runs]          (default 3 timed runs per recipe, after one warm-up)
#
# Baseline, measured on this machine class on the same model (issue #3): llama.cpp's
# llama-quantize Q8_0 6.2 CPU-s (0.36 GB of input per CPU-s), Q4_0 4.9 CPU-s; torch 17 CPU-s.
# Target: >= 1.8 GB of input per CPU-s, peak RSS <= 2 x largest tensor + 200 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
model="${MCOMPRESS_BENCH_DIR:-$HOME/.cache/mcompress/bench}/tinyllama-synth"
[ -f "$model/model.safetensors" ] || python3 scripts/gen_synthetic.py "$model"
command -v /usr/bin/time >/dev/null || { echo "bench.sh needs GNU time (apt-get install time)" >&2; exit 2; }
cargo build --release --locked -q
bin=target/release/mcompress
[ -n "${CARGO_TARGET_DIR:-}" ] && bin="$CARGO_TARGET_DIR/release/mcompress"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/int8.toml" <<TOML
[model]
path = "$model"
[[pass]]
type = "quantize-rtn"
bits = 8
group-size = 0
TOML
cat > "$work/int4.toml" <<TOML
[model]
path = "$model"
[[pass]]
type = "quantize-rtn"
bits = 4
group-size = 128
TOML

in_bytes=$(stat -c %s "$model/model.safetensors")
# Largest tensor: embed_tokens / lm_head, 32000 x 2048 BF16.
largest=$((32000 * 2048 * 2))
rss_limit_kb=$(( (2 * largest + 200 * 1024 * 1024) / 1024 ))
printf '%-5s %8s %8s %8s %10s %9s %8s %12s\n' recipe wall_s user_s sys_s "GB/CPU-s" rss_MiB "rss_ok" "vs_llama-q"
for r in int8 int4; do
  "$bin" run -q "$work/$r.toml" --out "$work/out" >/dev/null   # warm the page cache
  for i in $(seq "$runs"); do
    /usr/bin/time -f "%e %U %S %M" -o "$work/t" "$bin" run -q "$work/$r.toml" --out "$work/out" >/dev/null
    read -r wall user sys rss < "$work/t"
    base=$([ "$r" = int8 ] && echo 6.2 || echo 4.9)
    awk -v r="$r" -v w="$wall" -v u="$user" -v s="$sys" -v m="$rss" -v b="$in_bytes" -v lim="$rss_limit_kb" -v base="$base" 'BEGIN {
      cpu = u + s; printf "%-5s %8.2f %8.2f %8.2f %10.2f %9.0f %8s %11.2fx\n", r, w, u, s, b / 1e9 / cpu, m / 1024, (m <= lim ? "yes" : "NO"), base / cpu }'
  done
done
echo "input $(awk -v b="$in_bytes" 'BEGIN{printf "%.2f GB", b/1e9}'), RSS limit $((rss_limit_kb / 1024)) MiB; vs_llama-q = llama-quantize CPU-s / ours (Q8_0 6.2, Q4_0 4.9)"
