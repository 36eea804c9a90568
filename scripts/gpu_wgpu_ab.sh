#!/bin/bash
# Two or more `moe` binaries side by side on wgpu on a GPU machine (run by hand, session 15;
# run 3 of docs/benchmarks.md's section "wgpu on the H200 again"): decode and prefill with each
# shape run twice in one process (the second is the steady state; the first pays cubecl's
# kernel compilation), then layer cases. Prepare, in the repo root (.gitignore leaves both out):
# .dev/moe_NAME.xz for each binary (release, stripped, xz-compressed) and .gl/*.deb (the
# Vulkan/EGL loaders, as scripts/gpu_wgpu_profile.sh says); then run
# `bash scripts/gpu_wgpu_ab.sh a c b` there with .dev and .gl carried. LOCAL=1 skips the
# loaders; DEV, NT (new tokens), CTX, B (batches), CASES (layer cases) and Q (more `moe bench`
# flags, e.g. --quick) change what runs.
[ $# -ge 1 ] || { echo "usage: bash scripts/gpu_wgpu_ab.sh NAME... (.dev/moe_NAME.xz each)"; exit 2; }
[ -z "$LOCAL" ] && { for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig >/dev/null 2>&1; }
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json; [ -f $icd ] && export VK_DRIVER_FILES=$icd
for x in "$@"; do xz -dc ".dev/moe_$x.xz" > "/tmp/$x" && chmod +x "/tmp/$x" || exit 1; done
D=${DEV:-wgpu}; NT=${NT:-64}; CTX=${CTX:-128,1024}; B=${B:-1,1,16,16}
CASES=${CASES:-dense_active_fwd,moe_top2_fwd,model_}
echo "== decode and prefill, each shape twice"
for x in "$@"; do echo "-- $x"; timeout 120 "/tmp/$x" bench --decode --device $D --batch $B --context $CTX --new-tokens $NT | tail -n +3; done
echo "== layer cases"
for x in "$@"; do echo "-- $x"; timeout 120 "/tmp/$x" bench --device $D --cases $CASES $Q | grep -E "^(dense|moe|model)_"; done
