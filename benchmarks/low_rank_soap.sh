#!/usr/bin/env bash
# Issue 21's measurements of sre-soap (rkfac.LowRankSOAP: Adam in K-FAC's low-rank eigenbasis).
# Tables land in the --out directories; BENCHMARKS.md keeps them. Nothing else may run meanwhile.
#
#   benchmarks/low_rank_soap.sh autoencoder   # rkfac tune of sre-soap (lr × 0.1, 0.3, 1, 3), then 3 seeds, ≈ 17 min
#   benchmarks/low_rank_soap.sh peers         # tuned AdamW and SOAP on seed 0 in the same session, ≈ 9 min
#   benchmarks/low_rank_soap.sh ranks         # one epoch at r = 32, 64, 128 (220 is the tune's), ≈ 3 min
#   benchmarks/low_rank_soap.sh carry         # one epoch with carry keep and reset (rotate is the tune's), ≈ 2 min
#   benchmarks/low_rank_soap.sh steps         # ms per step, interleaved, on every preset's model, ≈ 10 min
set -euo pipefail
cd "$(dirname "$0")/.."
RKFAC=${RKFAC:-.venv/bin/rkfac}
PYTHON=${PYTHON:-.venv/bin/python}
AE=(--preset fashion-autoencoder --epochs 1 --quiet)
case "${1:-}" in
  autoencoder)
    "$RKFAC" tune --preset fashion-autoencoder --optimizers sre-soap --seeds 0,1,2 --out runs/tune-ae-sre-soap-v3 --quiet --resume ;;
  peers)
    "$RKFAC" bench --preset fashion-autoencoder-auto --optimizers adamw,soap --seeds 0 --out runs/ae-peers-s0 --quiet --resume ;;
  ranks)
    for rank in 32 64 128; do "$RKFAC" train --optimizer sre-soap "${AE[@]}" --rank "$rank" --out "runs/ae-sre-soap-rank$rank"; done ;;
  carry)
    for carry in keep reset; do "$RKFAC" train --optimizer sre-soap "${AE[@]}" --carry "$carry" --out "runs/ae-sre-soap-$carry"; done ;;
  steps)
    for preset in fashion-autoencoder fashion-mlp-wide fashion-cnn fashion-vit; do
      "$PYTHON" benchmarks/step_time.py --preset "$preset" --optimizers sgd,sre-kfac,soap,sre-soap --steps 50 --chunk 10
    done ;;
  *)
    echo "usage: $0 autoencoder|peers|ranks|carry|steps" >&2; exit 2 ;;
esac
