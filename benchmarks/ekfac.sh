#!/usr/bin/env bash
# Issue 21's EKFAC form (rkfac.LowRankEKFAC, `sre-ekfac`) against SRE-KFAC at the same settings,
# each tuned on the same grid (rkfac tune: lr x 0.1, 0.3, 1, 3 of its own, one epoch of seed 0).
# Tables land in the --out directories; BENCHMARKS.md keeps them. Nothing else may run meanwhile.
#
#   benchmarks/ekfac.sh autoencoder   # fashion-autoencoder (issue 20's K-FAC settings), seeds 0-2, 4 epochs, ~ 30 min
#   benchmarks/ekfac.sh cnn           # fashion-cnn at batch 256, the same protocol as vit (grid, then the winners), ~ 25 min
#   benchmarks/ekfac.sh every         # fashion-autoencoder, seed 0, 2 epochs: sre-kfac (lr 0.09) and sre-ekfac (0.03), each
#                                     # with factors every 10 steps (the preset's) and every step, ~ 5 min
#   benchmarks/ekfac.sh carry         # one epoch of sre-ekfac at the tuned lr with carry reset / keep / rotate, ~ 3 min
#   benchmarks/ekfac.sh vit           # fashion-vit (its position embedding now measured too): the grid, then the winners,
#                                     # seed 0, 3 epochs (EPOCHS=, SEEDS= to change), ~ 20 min
#   benchmarks/ekfac.sh steps         # ms per step, interleaved, of SGD, SRE-KFAC, sre-ekfac and sre-soap on every preset, ~ 10 min
set -euo pipefail
cd "$(dirname "$0")/.."
RKFAC=${RKFAC:-.venv/bin/rkfac}
case "${1:-}" in
  autoencoder)
    "$RKFAC" tune --preset fashion-autoencoder --optimizers sre-kfac,sre-ekfac --seeds 0,1,2 --out runs/tune-ae-ekfac --quiet --resume ;;
  vit)
    "$RKFAC" tune --preset fashion-vit --optimizers sre-kfac,sre-ekfac --seeds "${SEEDS:-0}" --epochs "${EPOCHS:-3}" \
      --out runs/tune-vit-ekfac --quiet --resume ;;
  cnn)
    "$RKFAC" tune --preset fashion-cnn --optimizers sre-kfac,sre-ekfac --seeds "${SEEDS:-0}" --epochs "${EPOCHS:-3}" \
      --out runs/tune-cnn-ekfac --quiet --resume ;;
  every)
    for every in 10 1; do
      for run in sre-kfac=0.09 sre-ekfac=0.03; do
        name=${run%%=*}
        out=runs/ekfac-every-$name-f$every
        [ -f "$out/summary.json" ] && continue
        "$RKFAC" train --preset fashion-autoencoder --optimizer "$name" --lr "${run#*=}" --factor-every "$every" --epochs 2 --quiet --out "$out"
      done
    done
    grep -H '"final_train_eval_loss"\|"seconds_per_epoch"' runs/ekfac-every-*/summary.json ;;
  carry)
    lr=${LR:-0.03}
    for carry in reset keep rotate; do
      [ -f "runs/ekfac-carry-$carry/summary.json" ] && continue
      "$RKFAC" train --preset fashion-autoencoder --optimizer sre-ekfac --lr "$lr" --ekfac-carry "$carry" --epochs 1 --quiet --out "runs/ekfac-carry-$carry"
    done
    grep -h '"final_train_eval_loss"\|"train_time"' runs/ekfac-carry-*/summary.json ;;
  steps)
    for preset in fashion-autoencoder fashion-mlp-wide fashion-cnn fashion-vit; do
      "${PYTHON:-.venv/bin/python}" benchmarks/step_time.py --preset "$preset" --optimizers sgd,sre-kfac,sre-ekfac,sre-soap --steps 50 --chunk 10
    done ;;
  *)
    echo "usage: $0 autoencoder|vit|cnn|every|carry|steps" >&2
    exit 2 ;;
esac
