#!/usr/bin/env bash
# Issue 19's bench: every optimizer tuned by the same protocol (rkfac tune: lr × 0.1, 0.3, 1, 3 of
# its own lr, chosen on one epoch of seed 0), then the winners on seeds 0, 1, 2. Tables land in
# the --out directory (tune.md, bench.md, bench-curves.png); BENCHMARKS.md keeps them.
#
#   benchmarks/tuned_peers.sh autoencoder     # fashion-autoencoder, about 75 min on 2 cores
#   benchmarks/tuned_peers.sh vgg-steps       # fashion-vgg: seconds per step over one K-FAC cycle
#
# Nothing else may run meanwhile (2 cores). Muon is left out on the CPU: torch's Muon runs its
# Newton–Schulz iteration in bfloat16, over 1 s per autoencoder step here (see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
RKFAC=${RKFAC:-.venv/bin/rkfac}
PYTHON=${PYTHON:-.venv/bin/python}
case "${1:-}" in
  autoencoder)
    "$RKFAC" tune --preset fashion-autoencoder --optimizers sgd,adamw,soap,kfac,sre-kfac --seeds 0,1,2 \
      --out runs/tune-fashion-autoencoder --quiet --resume ;;
  vgg-steps)
    "$PYTHON" benchmarks/step_time.py --preset fashion-vgg --optimizers sgd,kfac,sre-kfac --steps 50 --chunk 10 ;;
  *)
    echo "usage: $0 autoencoder|vgg-steps" >&2; exit 2 ;;
esac
