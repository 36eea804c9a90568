#!/usr/bin/env bash
# Branch-Train-MiX against dense at equal training tokens, for one seed (run it once per seed;
# compare the seeds with `moe compare`). Every model lands in ROOT/<variant>/seed-SEED, so that
#   moe compare ROOT/dense ROOT/merged-ft ROOT/frozen-ft ROOT/frozen-gen-ft
# gives each variant's loss with 95% intervals over the seeds, paired by seed.
#
#   scripts/btx_experiment.sh MOE_BINARY ROOT SEED [VARIANTS]
#
# Steps (of 16 x 128 tokens): a dense seed model (300), four branches from it, one per domain
# (200 each), the merge, fine-tuning of all weights on the mixture (100): 1200 steps in all,
# the dense baseline's budget. VARIANTS (default "full frozen frozen-gen") picks the branch
# and merge recipes:
#   full        branches train every weight; merge averages the non-FFN weights; fresh routers
#   frozen      branches train only their FFNs (moe branch --freeze-body); fresh routers
#   frozen-gen  frozen branches, the seed model's FFN as a generalist expert, routers from the
#               domains' mean hidden states
# Branch-Train-Merge (moe btm) scores the frozen branches against the merged models and dense.
#
# The step split can be changed (the total should stay the dense budget, 1200):
#   BASE_STEPS (300), BRANCH_STEPS (200, each of 4), BRANCH_LR (0.001), FT_STEPS (100).
set -euo pipefail
moe=$1 root=$2 seed=$3 variants=${4:-full frozen frozen-gen}
base_steps=${BASE_STEPS:-300} branch_steps=${BRANCH_STEPS:-200}
branch_lr=${BRANCH_LR:-0.001} ft_steps=${FT_STEPS:-100}
domains=(code arithmetic english spanish)
s=seed-$seed
run() { echo "+ $*" >&2; "$moe" "$@"; }

# A run counts as done when it has the checkpoint of its last step. Runs are found by path only,
# not by their settings: use one ROOT per split (a link ROOT/dense shares the dense baseline, a
# link ROOT/base the seed model of another ROOT with the same BASE_STEPS).
done_at() { [ -d "$1/checkpoints/step-$(printf %07d "$2")" ]; }
base="$root/base/$s"
if ! done_at "$base" "$base_steps"; then
  run train --dense --steps "$base_steps" --seed "$seed" --out "$base" --quiet
fi
for v in $variants; do
  case $v in
    full) branches=full-branches freeze=() ;;
    frozen|frozen-gen) branches=frozen-branches freeze=(--freeze-body) ;;
  esac
  if ! done_at "$root/$branches/$s/spanish" "$branch_steps"; then
    run branch --base "$base" --out "$root/$branches/$s" --steps "$branch_steps" --lr "$branch_lr" \
      --seed "$seed" "${freeze[@]}" --quiet
  fi
  paths=("${domains[@]/#/$root/$branches/$s/}")
  extra=()
  if [ "$v" = frozen-gen ]; then extra=(--generalist "$base" --router-init domain-means); fi
  run merge "${paths[@]}" --out "$root/$v/$s" --seed "$seed" "${extra[@]}"
  run train --from "$root/$v/$s" --steps "$ft_steps" --seed "$seed" --out "$root/$v-ft/$s" --quiet
done
if ! done_at "$root/dense/$s" 1200; then
  run train --dense --steps 1200 --seed "$seed" --out "$root/dense/$s" --quiet
fi
if [ -d "$root/frozen-branches/$s" ]; then
  against=()
  for v in $variants; do against+=("$root/$v-ft/$s"); done
  against+=("$root/dense/$s")
  run btm "${domains[@]/#/$root/frozen-branches/$s/}" --prefix 32 \
    --against "$(IFS=,; echo "${against[*]}")" > "$root/btm-$s.txt"
  cat "$root/btm-$s.txt"
fi
