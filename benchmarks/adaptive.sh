#!/usr/bin/env bash
# Issue 20's benches: the adaptive SRE-KFAC (sre-kfac-auto, library defaults, no tuning) against
# the peers. Tables land in the --out directories (bench.md, bench-curves.png, bench-adaptive.png);
# BENCHMARKS.md keeps them.
#
#   benchmarks/adaptive.sh autoencoder   # fashion-autoencoder-auto: AdamW and SOAP at their tuned lr, 3 seeds (~35 min)
#   benchmarks/adaptive.sh quick         # quick (MLP 1536, 2 epochs): SGD, Adam, SRE-KFAC, sre-kfac-auto (~5 min)
#   benchmarks/adaptive.sh mlp-2048      # fashion-mlp-wide-2048 (10 epochs at batch 2048), same four (~15 min)
#   benchmarks/adaptive.sh model-every   # sre-kfac-auto solving its model every 1, 2, 4 steps: quick (2 epochs) and
#                                        # fashion-autoencoder-auto (2 epochs), seed 0, interleaved (~12 min)
#   benchmarks/adaptive.sh sampling      # the curvature samples: the first 128 against 64 and 32 importance draws
#                                        # (PRESET=quick, 2 epochs; SEEDS=0,1), interleaved by seed (~8 min on quick)
#   benchmarks/adaptive.sh defaults      # sre-kfac-auto at its defaults (issue 20's "never diverges, 3 seeds") on
#                                        # fashion-vit, fashion-cnn, fashion-cnn-2048, fashion-mlp-wide-2048 and
#                                        # fashion-mlp-wide, seeds 0-2 interleaved by seed, then the table (~140 min);
#                                        # PRESETS="a b" and SEEDS="0 1" restrict it, EPOCHS=1 shortens each run,
#                                        # OUT (runs/defaults) is where runs go
#   benchmarks/adaptive.sh schedule      # sre-kfac-auto with factors and decompositions more often (SCHEDULES="fe:ie ...",
#                                        # default "3:10 1:5") on PRESET (fashion-mlp-wide-2048), SEEDS ("0"), into
#                                        # runs/schedule; the library's 10:50 is runs/defaults (~5 min a run on mlp-wide-2048)
#   benchmarks/adaptive.sh decay         # sre-kfac-auto with its step scale decayed (SCALE, default 1:1,4:0.3,5:0.1 by
#                                        # epoch) and SOAP at its tuned lr with the same decay (SOAP_LR), on PRESET
#                                        # (fashion-vit), SEEDS (0 1 2) interleaved by seed, into runs/decay (~12 min a seed)
#
# Nothing else may run meanwhile (2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
RKFAC=${RKFAC:-.venv/bin/rkfac}
PYTHON=${PYTHON:-.venv/bin/python}
case "${1:-}" in
  autoencoder)
    "$RKFAC" bench --preset fashion-autoencoder-auto --out runs/bench-autoencoder-auto --quiet --resume ;;
  quick)
    "$RKFAC" bench --preset quick --optimizers sgd,adam,sre-kfac,sre-kfac-auto --out runs/bench-quick-auto --quiet --resume ;;
  mlp-2048)
    "$RKFAC" bench --preset fashion-mlp-wide-2048 --optimizers sgd,adam,sre-kfac,sre-kfac-auto \
      --out runs/bench-mlp2048-auto --quiet --resume ;;
  model-every)
    for preset in quick fashion-autoencoder-auto; do
      "$RKFAC" bench --preset "$preset" --optimizers sre-kfac-auto,sre-kfac-auto-k2,sre-kfac-auto-k4 --epochs 2 --seeds 0 \
        --out "runs/bench-$preset-model-every" --quiet --resume
    done ;;
  sampling)
    preset=${PRESET:-quick}
    "$RKFAC" bench --preset "$preset" --optimizers sre-kfac-auto-first,sre-kfac-auto,sre-kfac-auto-is32 \
      --epochs "${EPOCHS:-2}" --seeds "${SEEDS:-0,1}" --out "runs/bench-$preset-sampling" --quiet --resume ;;
  defaults)
    read -r -a presets <<< "${PRESETS:-fashion-vit fashion-cnn fashion-cnn-2048 fashion-mlp-wide-2048 fashion-mlp-wide}"
    read -r -a seeds <<< "${SEEDS:-0 1 2}"
    root=${OUT:-runs/defaults}
    failed=()
    for seed in "${seeds[@]}"; do  # a run that fails is named at the end; the others go on
      for preset in "${presets[@]}"; do
        out=$root/$preset-s$seed
        [ -f "$out/summary.json" ] && continue
        "$RKFAC" train --optimizer sre-kfac-auto --preset "$preset" --seed "$seed" --quiet --out "$out" \
          ${EPOCHS:+--epochs "$EPOCHS"} || failed+=("$preset seed $seed")
      done
    done
    for preset in "${presets[@]}"; do
      runs=$(ls -d "$root/$preset"-s*/summary.json 2>/dev/null | xargs -r -n1 dirname | paste -sd,)
      [ -n "$runs" ] && "$PYTHON" benchmarks/equal_time.py --metric test_acc "$preset=$runs"
    done
    if [ ${#failed[@]} -gt 0 ]; then
      printf 'failed (no summary.json): %s\n' "${failed[@]}" >&2; exit 1
    fi ;;
  schedule)
    preset=${PRESET:-fashion-mlp-wide-2048}
    read -r -a seeds <<< "${SEEDS:-0}"
    for seed in "${seeds[@]}"; do
      for pair in ${SCHEDULES:-3:10 1:5}; do
        out=runs/schedule/$preset-f${pair%%:*}-i${pair##*:}-s$seed
        [ -f "$out/summary.json" ] && continue
        "$RKFAC" train --optimizer sre-kfac-auto --preset "$preset" --seed "$seed" --quiet --out "$out" \
          --factor-every "${pair%%:*}" --inverse-every "${pair##*:}"
      done
    done ;;
  decay)
    preset=${PRESET:-fashion-vit}
    for seed in ${SEEDS:-0 1 2}; do
      out=runs/decay/$preset-auto-s$seed
      [ -f "$out/summary.json" ] || "$RKFAC" train --optimizer sre-kfac-auto --preset "$preset" --seed "$seed" --quiet \
        --out "$out" --step-scale "${SCALE:-1:1,4:0.3,5:0.1}"
      out=runs/decay/$preset-soap-s$seed
      [ -f "$out/summary.json" ] || "$RKFAC" train --optimizer soap --preset "$preset" --seed "$seed" --quiet \
        --out "$out" --lr "${SOAP_LR:-1:3e-3,4:9e-4,5:3e-4}"
    done
    "$PYTHON" benchmarks/equal_time.py --metric test_acc "auto-decay=$(ls -d runs/decay/"$preset"-auto-s* | paste -sd,)" \
      "soap-decay=$(ls -d runs/decay/"$preset"-soap-s* | paste -sd,)" ;;
  *)
    echo "usage: $0 autoencoder|quick|mlp-2048|model-every|sampling|defaults|schedule|decay" >&2; exit 2 ;;
esac
