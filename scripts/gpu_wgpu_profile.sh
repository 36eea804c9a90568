#!/bin/bash
# Where wgpu's MoE time goes on a GPU machine (run by hand, session 15): the layer cases by
# expert layout with their breakdowns, decode wall time, then cubecl's kernel profile of decode
# steps (kernels and kernel time per step) and of two expert layouts. Prepare, in the repo root
# (.gitignore leaves both out):
#   .dev/moe.xz   a release `moe` binary, stripped and xz-compressed (the transfer limit)
#   .gl/*.deb     Debian's libvulkan1, libegl1, libglvnd0, libopengl0, libgl1, libglx0 and
#                 libgles2 (`apt-get download`), unpacked into / there when the GPU machine has
#                 no Vulkan loader
# and run `OUT=DIR bash scripts/gpu_wgpu_profile.sh` there with .dev and .gl carried; the JSON
# of the layer cases and the kernel logs land in DIR. LOCAL=1 skips the loaders (to try it here
# on lavapipe: DEV=wgpu:cpu N1=2 N2=5 Q="--quick --tokens 256" QP="--quick --tokens 256").
: "${OUT:?set OUT to a folder for the results}"
mkdir -p "$OUT" || exit 1
[ -z "$LOCAL" ] && { for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig >/dev/null 2>&1; }
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json; [ -f $icd ] && export VK_DRIVER_FILES=$icd
xz -dc .dev/moe.xz > /tmp/moe && chmod +x /tmp/moe || exit 1
M=/tmp/moe
export P=$PWD/scripts/cubecl_profile.py
D=${DEV:-wgpu}; export N1=${N1:-32} N2=${N2:-96}; Q=${Q:-}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== layers"
timeout 150 $M bench --device $D --cases dense_active_fwd,moe_top2_fwd,moe_top2_segments,moe_top2_padded,moe_top2_capacity,moe_e64 $Q --json > "$OUT/layers.json"; echo rc=$?
python3 - <<'PY'
import json, os
r = json.load(open(os.environ["OUT"] + "/layers.json"))
r = r["runs"][0] if "runs" in r else r
print("matmul GFLOP/s", round(r["matmul_gflops"]))
for c in r["cases"]: print("%-28s %10.0f tok/s %8.2f ms" % (c["name"], c["tokens_per_s"], c["ms"]))
for b in r["breakdown"]:
    print(b["case"]); [print("   %-45s %8.3f" % (s, m)) for s, m in b["stages"]]
print("ratios", r["ratios"], "failed", r["failed"])
PY
echo "== decode wall, twice (the first pays cubecl's kernel compilation)"
for i in 1 2; do timeout 100 $M bench --decode --device $D --batch 1,16 --context 128 --new-tokens 64 | tail -2; done
mkdir -p /tmp/p && cd /tmp/p || exit 1
printf '[profiling.logger]\nlevel = "basic"\nfile = "prof.log"\nappend = false\n' > cubecl.toml
echo "== decode profiled, batch 1, $N1 and $N2 new tokens: the difference is per step"
for n in $N1 $N2; do rm -f prof.log; timeout 100 $M bench --decode --device $D --batch 1 --context 128 --new-tokens $n | tail -1; mv prof.log d$n.log; done
python3 - <<'PY'
import importlib.util as u, os
s = u.spec_from_file_location("p", os.environ["P"]); p = u.module_from_spec(s); s.loader.exec_module(p)
n1, n2 = int(os.environ["N1"]), int(os.environ["N2"])
a, b = list(p.kernels(f"d{n1}.log")), list(p.kernels(f"d{n2}.log"))
per = lambda x, y: (x - y) / (n2 - n1)
print("per decode step: %.1f kernels, %.3f ms of kernel time" % (per(len(b), len(a)), per(sum(m for _, m in b), sum(m for _, m in a))))
PY
python3 $P d$N2.log --top 25
for c in moe_top2_segments moe_top2_padded; do
  echo "== profiled $c"; rm -f prof.log; timeout 120 $M bench --device $D ${QP:---quick} --cases $c > /dev/null; python3 $P prof.log --top 12
  mv prof.log "$c.log"
done
xz -T0 -c "d$N2.log" > "$OUT/decode.log.xz"; tar cJf "$OUT/layers_prof.tar.xz" moe_top2_*.log
