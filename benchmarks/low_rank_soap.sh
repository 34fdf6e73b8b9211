#!/usr/bin/env bash
# Issue 21's measurements of sre-soap (rkfac.LowRankSOAP: Adam in K-FAC's low-rank eigenbasis).
# Tables land in the --out directories; BENCHMARKS.md keeps them. Nothing else may run meanwhile.
#
#   benchmarks/low_rank_soap.sh autoencoder   # rkfac tune of sre-soap (lr × 0.1, 0.3, 1, 3), then 3 seeds × 8 epochs, ≈ 18 min
#   benchmarks/low_rank_soap.sh peers         # tuned AdamW and SOAP on seed 0 in the same session, ≈ 9 min
#   benchmarks/low_rank_soap.sh ranks         # one epoch at r = 32, 64, 128 (220 is the tune's), ≈ 3 min
#   benchmarks/low_rank_soap.sh carry         # one epoch with carry keep and reset (rotate is the tune's), ≈ 2 min
#   benchmarks/low_rank_soap.sh sweep         # 4 epochs at r = 32 (seed 0), 64, 128, 220, and 64 with factors every 3
#                                             # (seeds 0-2, interleaved by seed), then benchmarks/equal_time.py, ≈ 40 min
#   benchmarks/low_rank_soap.sh mlp2048       # rkfac tune of sre-soap, AdamW, SGD, SOAP on fashion-mlp-wide-2048, seeds 0-2, ≈ 105 min
#   benchmarks/low_rank_soap.sh cnn2048       # the same on fashion-cnn-2048, seed 0 (grid ≈ 25 min, the winners ≈ 55 min)
#   benchmarks/low_rank_soap.sh cnn2048-winners  # only the grid's winners (session 12's grid), 10 epochs of seed 0, in one
#                                             # session, then benchmarks/equal_time.py on test accuracy, ≈ 60 min
#   benchmarks/low_rank_soap.sh cnn           # rkfac tune of sre-soap, AdamW, SGD, SOAP on fashion-cnn (batch 256), seed 0:
#                                             # (grid, one epoch a point, ~ 65 min), then the winners, 5 epochs (~ 40 min): one whole session
#   benchmarks/low_rank_soap.sh vit           # rkfac tune of sre-soap, AdamW, SOAP, SGD on fashion-vit, seed 0, ≈ 40 min
#   benchmarks/low_rank_soap.sh vit-winners   # only the grid's winners (session 13's grid), 5 epochs of seeds 0-2, in one
#                                             # session, then benchmarks/equal_time.py on test accuracy, ≈ 45 min
#   benchmarks/low_rank_soap.sh mlp2048-decay # the mlp2048 winners with one step decay for all (lr x 0.3 from epoch 5,
#                                             # x 0.1 from epoch 8), seed 0: sre-soap, SOAP, then AdamW, ≈ 25 min
#   benchmarks/low_rank_soap.sh subset        # statistics on the first 512 / 256 samples at batch 2048: ms per step on
#                                             # mlp-wide and cnn, then 3 seeds x 10 epochs of m = 512 on mlp-wide, ≈ 25 min
#   benchmarks/low_rank_soap.sh steps         # ms per step, interleaved, on every preset's model, ≈ 15 min
#                                             # (sre-soap at its defaults, at r = 64, and at r = 64 with factors every 3)
#   benchmarks/low_rank_soap.sh steps-peers   # ms per step, interleaved, of AdamW, SGD, SRE-KFAC, sre-kfac-auto, sre-soap and SOAP at
#                                             # each preset's settings; PRESETS (default: the two batch-2048 presets and the ViT) and
#                                             # STEPS (default 50, one K-FAC cycle) choose; ≈ 20 min for the defaults
#   benchmarks/low_rank_soap.sh vit-periods   # sre-soap's statistics less often on fashion-vit: ms per step of SGD, SOAP, sre-soap
#                                             # with factors every 3 (default), 10, and 10 with bases every 30; then 5 epochs of
#                                             # FACTOR_EVERY (10) against sre-soap's default and SOAP, all at the grid's lr 3e-3,
#                                             # SEEDS (0,1,2) interleaved by seed, into runs/vit-periods-*; ≈ 15 min a seed
#   benchmarks/low_rank_soap.sh cnn2048-seeds # sre-soap (9e-3) and SOAP (3e-3), the cnn2048 grid's winners, for SEEDS (1 2) and
#                                             # EPOCHS (4: both targets fell by epoch 3 on seed 0) interleaved by seed, then the
#                                             # time to each target per seed; ≈ 10 min a run
#   benchmarks/low_rank_soap.sh vit-rank      # sre-soap at RANK (400: every ViT factor whole, exact eigh) on fashion-vit, lr 3e-3,
#                                             # seeds 0-2, beside vit-periods' runs (run that first); ≈ 10 min
set -euo pipefail
cd "$(dirname "$0")/.."
RKFAC=${RKFAC:-.venv/bin/rkfac}
PYTHON=${PYTHON:-.venv/bin/python}
AE=(--preset fashion-autoencoder --epochs 1 --quiet)

# winners PRESET OUT SEEDS AT NAME=LR...: rkfac train of each NAME at its LR (a number or an epoch
# schedule) on PRESET for each of SEEDS (comma-separated, interleaved by seed) into OUT-NAME-sSEED,
# skipping finished runs; then equal_time.py on test accuracy at AT seconds, medians over seeds.
winners() {
  local preset=$1 out=$2 seeds=$3 at=$4 seed winner name groups=()
  shift 4
  for seed in ${seeds//,/ }; do
    for winner in "$@"; do
      name=${winner%%=*}
      [ -f "$out-$name-s$seed/summary.json" ] && continue
      "$RKFAC" train --optimizer "$name" --preset "$preset" --lr "${winner#*=}" --seed "$seed" --quiet --out "$out-$name-s$seed"
    done
  done
  for winner in "$@"; do
    name=${winner%%=*}
    groups+=("$name=$(ls -d "$out-$name"-s* | paste -sd,)")
  done
  "$PYTHON" benchmarks/equal_time.py --metric test_acc --at "$at" "${groups[@]}"
}
case "${1:-}" in
  autoencoder)
    "$RKFAC" tune --preset fashion-autoencoder --optimizers sre-soap --seeds 0,1,2 --epochs 8 --out runs/tune-ae-sre-soap-v4 --quiet --resume ;;
  mlp2048)  # Muon left out: torch's bfloat16 Newton-Schulz is far too slow on this CPU
    "$RKFAC" tune --preset fashion-mlp-wide-2048 --optimizers sre-soap,adamw,sgd,soap --seeds 0,1,2 --out runs/tune-mlp2048 --quiet --resume ;;
  cnn2048)
    "$RKFAC" tune --preset fashion-cnn-2048 --optimizers sre-soap,adamw,sgd,soap --seeds 0 --out runs/tune-cnn2048 --quiet --resume ;;
  cnn2048-winners)  # the lrs session 12's grid chose (BENCHMARKS.md): the × 3 point for all but SGD's × 0.3
    winners fashion-cnn-2048 runs/cnn2048 0 60,120,240,480,960 sre-soap=9e-3 adamw=3e-3 soap=3e-3 sgd=0.015 ;;
  cnn)
    "$RKFAC" tune --preset fashion-cnn --optimizers sre-soap,adamw,sgd,soap --seeds 0 --out runs/tune-cnn --quiet --resume ;;
  vit)  # Muon left out as on mlp2048 (its CPU bfloat16 Newton-Schulz, 3.2x AdamW's step here)
    "$RKFAC" tune --preset fashion-vit --optimizers sre-soap,adamw,soap,sgd --seeds 0 --out runs/tune-vit --quiet --resume ;;
  vit-winners)  # the lrs session 13's grid chose (BENCHMARKS.md)
    winners fashion-vit runs/vit 0,1,2 30,60,120,180 sre-soap=3e-3 adamw=1e-3 soap=3e-3 sgd=0.15 ;;
  mlp2048-decay)  # the same decay (x 0.3 from epoch 5, x 0.1 from 8) on each tuned lr (session 12's grid)
    winners fashion-mlp-wide-2048 runs/mlp2048-decay 0 40,80,160,240 \
      sre-soap=1:3e-3,5:9e-4,8:3e-4 soap=1:3e-3,5:9e-4,8:3e-4 adamw=1:1e-3,5:3e-4,8:1e-4 ;;
  peers)
    "$RKFAC" bench --preset fashion-autoencoder-auto --optimizers adamw,soap --seeds 0 --out runs/ae-peers-s0 --quiet --resume ;;
  ranks)
    for rank in 32 64 128; do "$RKFAC" train --optimizer sre-soap "${AE[@]}" --rank "$rank" --out "runs/ae-sre-soap-rank$rank"; done ;;
  carry)
    for carry in keep reset; do "$RKFAC" train --optimizer sre-soap "${AE[@]}" --carry "$carry" --out "runs/ae-sre-soap-$carry"; done ;;
  sweep)
    SWEEP=runs/ae-soap-sweep
    for seed in 0 1 2; do
      settings=("r64:--rank 64" "r128:--rank 128" "r220:--rank 220" "r64-fe3:--rank 64 --factor-every 3")
      [ "$seed" = 0 ] && settings=("r32:--rank 32" "${settings[@]}")
      for setting in "${settings[@]}"; do
        label=${setting%%:*}; flags=${setting#*:}
        [ -f "$SWEEP/$label-s$seed/summary.json" ] && continue
        # shellcheck disable=SC2086
        "$RKFAC" train --optimizer sre-soap --preset fashion-autoencoder --seed "$seed" $flags --quiet --out "$SWEEP/$label-s$seed"
      done
    done
    groups=()
    for label in r32 r64 r128 r220 r64-fe3; do
      groups+=("$label=$(ls -d "$SWEEP/$label"-s* | paste -sd,)")
    done
    "$PYTHON" benchmarks/equal_time.py --at 40,80,120,150,200,250 "${groups[@]}" ;;
  subset)
    for preset in fashion-mlp-wide-2048 fashion-cnn-2048; do
      "$PYTHON" benchmarks/step_time.py --preset "$preset" --steps 30 --chunk 10 \
        --optimizers "adamw,sre-soap,sre-soap[statistics_samples=512],sre-soap[statistics_samples=256]"
    done
    for seed in 0 1 2; do
      [ -f "runs/mlp2048-sre-soap-m512-s$seed/summary.json" ] && continue
      "$RKFAC" train --optimizer sre-soap --preset fashion-mlp-wide-2048 --statistics-samples 512 --seed "$seed" --quiet \
        --out "runs/mlp2048-sre-soap-m512-s$seed"
    done
    "$PYTHON" benchmarks/equal_time.py --metric test_acc --at 20,40,80,160,240 \
      "all=$(ls -d runs/tune-mlp2048/sre-soap-seed* | paste -sd,)" "m512=$(ls -d runs/mlp2048-sre-soap-m512-s* | paste -sd,)" \
      "adamw=$(ls -d runs/tune-mlp2048/adamw-seed* | paste -sd,)" "sgd=$(ls -d runs/tune-mlp2048/sgd-seed* | paste -sd,)" \
      "soap=$(ls -d runs/tune-mlp2048/soap-seed* | paste -sd,)" ;;
  steps)
    for preset in fashion-autoencoder fashion-mlp-wide fashion-cnn fashion-vit; do
      "$PYTHON" benchmarks/step_time.py --preset "$preset" --optimizers "sgd,sre-kfac,soap,sre-soap,sre-soap[rank=64],sre-soap[rank=64;factor_every=3]" --steps 50 --chunk 10
    done ;;
  steps-peers)
    mkdir -p runs/steps-peers
    for preset in ${PRESETS:-fashion-vit fashion-mlp-wide-2048 fashion-cnn-2048}; do
      "$PYTHON" benchmarks/step_time.py --preset "$preset" --optimizers adamw,sgd,sre-kfac,sre-kfac-auto,sre-soap,soap \
        --steps "${STEPS:-50}" --chunk 10 --json "runs/steps-peers/$preset.json"
    done ;;
  vit-periods)
    mkdir -p runs/vit-periods
    [ -f runs/vit-periods/steps.json ] || "$PYTHON" benchmarks/step_time.py --preset fashion-vit \
      --optimizers "sgd,soap,sre-soap,sre-soap[factor_every=10],sre-soap[factor_every=10;inverse_every=30]" \
      --steps 60 --chunk 10 --json runs/vit-periods/steps.json
    every=${FACTOR_EVERY:-10}
    for seed in ${SEEDS:-0 1 2}; do
      for variant in "sre-soap-f$every:sre-soap:--factor-every $every" "sre-soap:sre-soap:" "soap:soap:"; do
        IFS=: read -r label name extra <<< "$variant"
        out=runs/vit-periods-$label-s$seed
        [ -f "$out/summary.json" ] && continue
        # shellcheck disable=SC2086  # $extra is a flag and its value
        "$RKFAC" train --optimizer "$name" --preset fashion-vit --lr 3e-3 --seed "$seed" --quiet --out "$out" $extra
      done
    done
    "$PYTHON" benchmarks/equal_time.py --metric test_acc --at 30,60,120,180 \
      "sre-soap-f$every=$(ls -d runs/vit-periods-sre-soap-f"$every"-s* | paste -sd,)" \
      "sre-soap=$(ls -d runs/vit-periods-sre-soap-s* | paste -sd,)" "soap=$(ls -d runs/vit-periods-soap-s* | paste -sd,)" ;;
  cnn2048-seeds)
    for seed in ${SEEDS:-1 2}; do
      for winner in sre-soap=9e-3 soap=3e-3; do
        out=runs/cnn2048-${winner%%=*}-s$seed
        [ -f "$out/summary.json" ] || "$RKFAC" train --optimizer "${winner%%=*}" --preset fashion-cnn-2048 --lr "${winner#*=}" \
          --seed "$seed" --epochs "${EPOCHS:-4}" --quiet --out "$out"
      done
    done
    "$PYTHON" benchmarks/equal_time.py --metric test_acc "sre-soap=$(ls -d runs/cnn2048-sre-soap-s* | paste -sd,)" \
      "soap=$(ls -d runs/cnn2048-soap-s* | paste -sd,)" ;;
  vit-rank)
    rank=${RANK:-400}
    for seed in 0 1 2; do
      out=runs/vit-periods-sre-soap-r$rank-s$seed
      [ -f "$out/summary.json" ] || "$RKFAC" train --optimizer sre-soap --preset fashion-vit --lr 3e-3 --rank "$rank" \
        --seed "$seed" --quiet --out "$out"
    done
    "$PYTHON" benchmarks/equal_time.py --metric test_acc --at 30,60,120,180 \
      "sre-soap-r$rank=$(ls -d runs/vit-periods-sre-soap-r"$rank"-s* | paste -sd,)" \
      "sre-soap=$(ls -d runs/vit-periods-sre-soap-s* | paste -sd,)" "soap=$(ls -d runs/vit-periods-soap-s* | paste -sd,)" ;;
  *)
    echo "usage: $0 autoencoder|peers|mlp2048|cnn2048|cnn|cnn2048-winners|vit|vit-winners|mlp2048-decay|ranks|carry|sweep|subset|steps|steps-peers|vit-periods|vit-rank|cnn2048-seeds" >&2; exit 2 ;;
esac
