#!/usr/bin/env bash
# Usage (repository root, after `edgegpt bench --preset small --work-dir runs/bench-small --formats fp32,int8,int4` built
# the bundles and `make web`): web/scripts/bench.sh
# Decode tokens/s of small fp32/int8/int4: the Python runtime (2 threads) vs headless Chromium (wasm, 2 and 1 threads),
# interleaved, 3 rounds. Each browser figure is the second of two generations on one page (the first warms up).
set -euo pipefail
B=${B:-runs/bench-small}; E=${E:-edgegpt}; WEB=${WEB:-web}
PROMPT='def main(args):'
N=64
for fmt in fp32 int8 int4; do
  $E web $B/bundle-$fmt --port 8790 >/dev/null 2>&1 & server=$!
  sleep 2
  for round in 1 2 3; do
    py=$($E generate $B/bundle-$fmt "$PROMPT" -n $N --ignore-eos --threads 2 --json 2>/dev/null | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["timings"]["tokens_per_s"],1))')
    for t in 2 1; do
      r=$(node $WEB/scripts/browser.mjs "http://127.0.0.1:8790/?ignore-eos&threads=$t&provider=wasm" --prompt "$PROMPT" --max-new-tokens $N --repeat 2)
      eval "w$t=$(echo "$r" | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["isolated"], d; print(round(d["runs"][1]["tokensPerS"],1))')"
    done
    echo "$fmt round $round: python $py  chromium-wasm-2t $w2  chromium-wasm-1t $w1  load $(cut -d' ' -f1-3 /proc/loadavg)"
  done
  kill $server; wait $server 2>/dev/null || true
done
