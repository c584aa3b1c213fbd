#!/usr/bin/env bash
# Streaming on a mixture of experts: data-free passes on a synthetic Mixtral-layout MoE
# (scripts/gen_synthetic.py --preset mixtral-synth: 24 blocks of 32 experts, 4.1B parameters,
# ~8.2 GB BF16), generated on first use into ~/.cache/mcompress/bench, with SmolLM2's tokenizer
# (from the smollm2 fixture: scripts/fetch-fixtures.sh smollm2) so that the GGUF names a
# pre-tokenizer llama.cpp knows. Not a test: prints wall, CPU seconds and peak RSS per run beside
# the input size and its largest tensor (the 201 MB embedding). What it shows: RTN int4 into
# compressed-tensors and a Q4_K_M GGUF (every block's experts stacked into ffn_*_exps) stream
# tensor by tensor, never the model or a stack at once.
#
#   scripts/bench-moe.sh            (needs ~8 GB for the model and ~5 GB for the outputs)
#   PRESET=qwen3-moe-synth RUNS=int4 scripts/bench-moe.sh
#       (Qwen3-30B-A3B's layout with 64 experts per block: 32 GB, larger than a 24 GiB machine;
#       ~9 GB of output; only int4: its synthetic byte-level tokenizer names no pre-tokenizer
#       llama.cpp knows, so a GGUF export is refused)
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${PRESET:-mixtral-synth}
model="${MCOMPRESS_BENCH_DIR:-$HOME/.cache/mcompress/bench}/$preset"
[ -f "$model/model.safetensors" ] || python3 scripts/gen_synthetic.py "$model" --preset "$preset"
command -v /usr/bin/time >/dev/null || { echo "bench-moe.sh needs GNU time (apt-get install time)" >&2; exit 2; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mcompress/target}"
bin=${MCOMPRESS:-$CARGO_TARGET_DIR/debug/mcompress}
[ -x "$bin" ] || { cargo build --locked -q; bin="$CARGO_TARGET_DIR/debug/mcompress"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
vocab=$(python3 -c "import json; print(json.load(open('$model/config.json'))['vocab_size'])")
if [ "$vocab" = 49152 ] && ! grep -q '"<|im_start|>"' "$model/tokenizer.json"; then
  smol="${MCOMPRESS_FIXTURES:-$HOME/.cache/mcompress/fixtures}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$smol" ] || { echo "bench-moe.sh needs the smollm2 fixture (scripts/fetch-fixtures.sh smollm2)" >&2; exit 2; }
  printf '[model]\npath = "%s"\n' "$smol" > "$work/tok.toml"
  "$bin" run -q --out "$work/tok" "$work/tok.toml" >/dev/null
  cp "$work/tok/default/tokenizer.json" "$work/tok/default/tokenizer_config.json" "$model/"
  rm -rf "$work/tok"
fi
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
largest=$(python3 -c "import json; c = json.load(open('$model/config.json')); print(c['vocab_size'] * c['hidden_size'] * 2)")
awk -v i="$in_bytes" -v l="$largest" 'BEGIN { printf "input %.2f GB, largest tensor %.0f MB\n", i / 1e9, l / 1e6 }'
for r in ${RUNS:-int4 q4km}; do
  rm -rf "$work/out"
  /usr/bin/time -f '%e %U %S %M' -o "$work/time" "$bin" run -q --out "$work/out" "$work/$r.toml" >/dev/null
  read -r wall user sys rss_kb < "$work/time"
  out_bytes=$(du -sb "$work/out" | cut -f1)
  awk -v r="$r" -v w="$wall" -v u="$user" -v s="$sys" -v m="$rss_kb" -v o="$out_bytes" \
    'BEGIN { printf "%-5s wall %6.1f s  cpu %6.1f s  peak RSS %5.0f MiB  output %.2f GB\n", r, w, u + s, m / 1024, o / 1e9 }'
done
