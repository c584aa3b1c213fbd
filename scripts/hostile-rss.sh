#!/usr/bin/env bash
# Peak memory and wall time of mcompress on hostile inputs at (and just past) the documented limits
# (docs/limits.md), one row per input class: the exit code must be 2 for input past a limit, and
# memory must stay bounded by the limit, not by what the file claims. Not run by CI (it writes
# ~300 MB of inputs); docs/limits.md has the figures of the last run.
#
#   scripts/hostile-rss.sh            # uses target/debug/mcompress under $CARGO_TARGET_DIR
#   MCOMPRESS=path/to/mcompress scripts/hostile-rss.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${MCOMPRESS:-${CARGO_TARGET_DIR:-target}/debug/mcompress}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 - "$work" <<'EOF'
import json, os, struct, sys
w = sys.argv[1]
def put(name, data):
    with open(os.path.join(w, name), "wb") as f:
        f.write(data)
# safetensors: a header length past the 100 MB limit (the file is 8 bytes plus a little).
put("st-claims-huge.safetensors", struct.pack("<Q", 100_000_001) + b"{}")
# safetensors: a real 99 MB header (one tensor, then whitespace up to the limit).
hdr = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
hdr = hdr + b" " * (99_000_000 - len(hdr))
put("st-99mb-header.safetensors", struct.pack("<Q", len(hdr)) + hdr + b"\0\0\0\0")
# GGUF: metadata arrays over the 8 Mi element limit, and one array claiming 2^60 elements.
def gguf(kvs):
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for k, body in kvs:
        kb = k.encode()
        out += struct.pack("<Q", len(kb)) + kb + body
    return out
u32_array = lambda n: struct.pack("<IIQ", 9, 4, n) + b"\0" * (4 * n)
put("gguf-8mi-plus-1.gguf", gguf([("a", u32_array(8 * 1024 * 1024 + 1))]))
put("gguf-claims-2e60.gguf", gguf([("a", struct.pack("<IIQ", 9, 4, 1 << 60))]))
# config.json: 64 MiB + 1 of whitespace around {} beside a one-tensor model.
os.makedirs(os.path.join(w, "bigconfig"))
put("bigconfig/config.json", b"{}" + b" " * (64 * 1024 * 1024 - 1))
put("bigconfig/model.safetensors", struct.pack("<Q", len(hdr[:100].rstrip())) + hdr[:100].rstrip() + b"\0\0\0\0")
# recipe: 16 MiB + 1 of comment lines.
put("big-recipe.toml", b"# x\n" * (4 * 1024 * 1024) + b"\n")
# CSV eval set: one line of 1 MiB + 1.
put("long-line.csv", b"1," + b"0" * (1024 * 1024) + b"\n")
# report.json of 64 MiB + 1 (compare).
put("big-report.json", b"{}" + b" " * (64 * 1024 * 1024 - 1))
EOF
# A recipe whose eval set is the long CSV line (the quickstart's model).
cat >"$work/csv.toml" <<EOF
[model]
path = "$PWD/fixtures/digits-mlp"
[[pass]]
type = "quantize-rtn"
bits = 8
group-size = 0
[eval]
set = "$work/long-line.csv"
metric = "accuracy"
[output]
dir = "$work/out"
[[target]]
name = "t"
EOF
mkfifo "$work/fifo.safetensors"

printf '| input | command | exit | peak RSS MB | seconds | message |\n|---|---|---:|---:|---:|---|\n'
row() {
  local what="$1"; shift
  local t="$work/time"
  set +e
  /usr/bin/time -o "$t" -f "%M %e" timeout 60 "$bin" "$@" >/dev/null 2>"$work/err"
  local code=$?
  set -e
  read -r kb secs < <(tail -1 "$t") || true
  local msg
  msg="$(head -c 160 "$work/err" | tr '\n|' '  ' | sed "s#$work/##g")"
  printf '| %s | `%s` | %s | %d | %s | %s |\n' "$what" "$1" "$code" "$((kb / 1024))" "$secs" "$msg"
}
row "safetensors header length 100,000,001 (file of 10 bytes)" inspect "$work/st-claims-huge.safetensors"
row "safetensors header of 99 MB (under the limit)" inspect "$work/st-99mb-header.safetensors"
row "GGUF metadata array of 8 Mi + 1 elements" inspect "$work/gguf-8mi-plus-1.gguf"
row "GGUF metadata array claiming 2^60 elements" inspect "$work/gguf-claims-2e60.gguf"
row "config.json of 64 MiB + 1" inspect "$work/bigconfig"
row "recipe of 16 MiB + 1" recipe check "$work/big-recipe.toml"
row "CSV eval set, one line of 1 MiB + 1" run -q "$work/csv.toml"
row "report.json of 64 MiB + 1" compare "$work/big-report.json" "$work/big-report.json"
row "FIFO as a model file (must not block)" inspect "$work/fifo.safetensors"
