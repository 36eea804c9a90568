#!/bin/bash
# One device check of wgpu on a GPU machine against flex (run by hand, session 13): greedy
# tokens and logits of a checkpoint on both backends, then `moe bench --decode` and the layer
# cases side by side. Prepare, in the repo root (all ignored by git):
#   .dev/moe.xz        a release `moe` binary, stripped and xz-compressed (the transfer limit)
#   .dev/ck/           a checkpoint (config.json, model.bpk, tokenizer.json)
#   .dev/prompts.txt   a few prompts, one per line
#   .gl/*.deb          the Vulkan/EGL loaders (see the device tool's README)
# and run `bash scripts/gpu_wgpu_check.sh 2>&1 | tee $OUT/log.txt` there with .dev and .gl carried.
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f $icd ] && export VK_DRIVER_FILES=$icd
xz -dc .dev/moe.xz > /tmp/moe && chmod +x /tmp/moe
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
nproc
cd .dev || exit 1
M=/tmp/moe
for d in flex wgpu; do
  echo "== generate $d"
  timeout 90 $M generate ck --prompts prompts.txt --greedy --max-new-tokens 48 --json --device $d > "$OUT/gen_$d.json"; echo rc=$?
  timeout 60 $M logits ck --prompt "def add(a, b): return a + b" --device $d > "$OUT/logits_$d.json"; echo rc=$?
done
python3 - <<'PY'
import json, os
o = os.environ["OUT"]
g = [json.load(open(f"{o}/gen_{d}.json")) for d in ("flex", "wgpu")]
same = [a["new_tokens"] == b["new_tokens"] for a, b in zip(g[0]["results"], g[1]["results"])]
print("greedy tokens equal per prompt:", same)
l = [json.load(open(f"{o}/logits_{d}.json"))["logits"] for d in ("flex", "wgpu")]
print("max |logit diff|:", max(abs(x - y) for ra, rb in zip(*l) for x, y in zip(ra, rb)))
PY
echo "== decode bench"; timeout 240 $M bench --decode --device wgpu,flex --json > "$OUT/decode.json"; echo rc=$?
echo "== layer bench"; timeout 150 $M bench --device wgpu,flex --quick --json > "$OUT/layer.json"; echo rc=$?
