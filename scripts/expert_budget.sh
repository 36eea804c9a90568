#!/usr/bin/env bash
# The figures of docs/memory.md for the expert budget: an OLMoE-shaped random checkpoint
# (8 layers, 64 experts of d_ff 512, top-8, d_model 1024: 3.0 GiB of f32 experts), decoded fully
# resident and under a 768 MiB budget (25%), peak RSS by /usr/bin/time -v; then a routing trace
# replayed by `moe cache-sim`. Needs numpy (scripts/make_big_hf.py) and a release build:
#   cargo build --release --workspace && MOE=target/release/moe scripts/expert_budget.sh /tmp/eb
set -euo pipefail
OUT=${1:-/tmp/expert-budget}
MOE=${MOE:-target/release/moe}
PY=${PY:-python3}
NEW=${NEW:-64}
mkdir -p "$OUT"
[ -d "$OUT/hf" ] || $PY scripts/make_big_hf.py "$OUT/hf" --layers 8 --experts 64 --top-k 8 \
    --d-model 1024 --d-ff 512 --layers-per-shard 2
[ -d "$OUT/ckpt" ] || $MOE import-hf "$OUT/hf" --out "$OUT/ckpt"
[ -d "$OUT/q8" ] || $MOE quantize "$OUT/ckpt" --experts q8 --out "$OUT/q8"
PROMPT=$(seq -s, 101 397 9600)   # 25 ids spread over the vocabulary
run() { # name, checkpoint, extra flags...
    local name=$1 ckpt=$2; shift 2
    /usr/bin/time -v "$MOE" generate "$ckpt" --ids "$PROMPT" --max-new-tokens "$NEW" \
        --temperature 1.0 --seed 7 --json "$@" > "$OUT/$name.json" 2> "$OUT/$name.time"
    local rss; rss=$(grep "Maximum resident" "$OUT/$name.time" | awk '{print $6}')
    $PY - "$OUT/$name.json" "$name" "$rss" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); s = d.get("expert_store") or {}
rate = lambda k: f"{100 * s[k]:.1f}%" if k in s else "-"
print(f"{sys.argv[2]:<22} {d['tokens_per_second']:7.2f} tok/s  peak {int(sys.argv[3]) / 2**20:5.2f} GiB"
      f"  hit {rate('hit_rate'):>6}  belady {rate('belady_hit_rate'):>6}"
      f"  prefetch p/r {rate('prefetch_precision')}/{rate('prefetch_recall')}"
      f"  stall {s.get('stall_seconds', 0):.2f} s")
PY
}
run resident "$OUT/ckpt"
run lru-768MiB "$OUT/ckpt" --expert-budget 768MiB
run lru-768MiB-prefetch "$OUT/ckpt" --expert-budget 768MiB --prefetch
run lfu-768MiB "$OUT/ckpt" --expert-budget 768MiB --expert-cache lfu
run q8-resident "$OUT/q8"
run q8-lru-768MiB "$OUT/q8" --expert-budget 768MiB
$MOE trace "$OUT/ckpt" --tokens 512 --out "$OUT/trace.jsonl"
$MOE cache-sim "$OUT/trace.jsonl" --budget 384MiB,768MiB,1536MiB
