#!/usr/bin/env bash
# Streaming on a mixture of experts: data-free passes on a synthetic Mixtral-layout MoE
# (scripts/gen_synthetic.py --preset mixtral-synth: 24 blocks of 32 experts, 4.0B parameters,
# ~8 GB BF16), generated on first use into ~/.cache/mcompress/bench. Not a test: prints wall,
# CPU seconds and peak RSS per run beside the input size and its largest tensor (the 131 MB
# embedding). What it shows: RTN int4 into compressed-tensors and a Q4_K_M GGUF (every block's
# experts stacked into ffn_*_exps) stream tensor by tensor, never the model or a stack at once.
#
#   scripts/bench-moe.sh            (needs ~8 GB for the model and ~5 GB for the outputs)
set -euo pipefail
cd "$(dirname "$0")/.."
model="${MCOMPRESS_BENCH_DIR:-$HOME/.cache/mcompress/bench}/mixtral-synth"
[ -f "$model/model.safetensors" ] || python3 scripts/gen_synthetic.py "$model" --preset mixtral-synth
command -v /usr/bin/time >/dev/null || { echo "bench-moe.sh needs GNU time (apt-get install time)" >&2; exit 2; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mcompress/target}"
cargo build --locked -q
bin="$CARGO_TARGET_DIR/debug/mcompress"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/int4.toml" <<TOML
[model]
path = "$model"
[[pass]]
type = "quantize-rtn"
bits = 4
group-size = 128
TOML
cat > "$work/q4km.toml" <<TOML
[model]
path = "$model"
[[target]]
name = "gguf"
formats = ["gguf"]
gguf-type = "Q4_K_M"
TOML

in_bytes=$(stat -c %s "$model/model.safetensors")
largest=$((32000 * 2048 * 2))
printf 'input %.2f GB, largest tensor %.0f MB\n' "$(echo "$in_bytes / 1e9" | bc -l)" "$(echo "$largest / 1e6" | bc -l)"
for r in int4 q4km; do
  rm -rf "$work/out"
  /usr/bin/time -f '%e %U %S %M' -o "$work/time" "$bin" run -q --out "$work/out" "$work/$r.toml" >/dev/null
  read -r wall user sys rss_kb < "$work/time"
  out_bytes=$(du -sb "$work/out" | cut -f1)
  printf '%-5s wall %6.1f s  cpu %6.1f s  peak RSS %5.0f MiB  output %.2f GB\n' \
    "$r" "$wall" "$(echo "$user + $sys" | bc -l)" "$(echo "$rss_kb / 1024" | bc -l)" "$(echo "$out_bytes / 1e9" | bc -l)"
done
