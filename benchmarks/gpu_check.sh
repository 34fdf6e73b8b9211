#!/usr/bin/env bash
# The one prepared GPU check (issue 19): CUDA tests, then the step time of each preset's model for
# SGD, AdamW, exact K-FAC and SRE-KFAC on the GPU, as one table. Sized for at most 8 minutes on one
# GPU. `benchmarks/gpu_check.sh --cpu` runs the same on the CPU with tiny models, to prove it works.
#
# PYTHON: the interpreter with a CUDA torch and rkfac installed (default: .venv/bin/python if it
# exists, else python). Record what it prints, with the device line, in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
if [ "${1:-}" = "--cpu" ]; then
    timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests || [ $? -eq 5 ]  # 5: none collected
    exec timeout 300 "$PYTHON" benchmarks/gpu_step_times.py --device cpu --width-scale 0.125 --batch-size 16 \
        --steps 3 --warmup 1 --rounds 1
fi
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device for this torch'; print(torch.cuda.get_device_name())"
timeout 180 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests
exec timeout 330 "$PYTHON" benchmarks/gpu_step_times.py --device cuda --steps 60 --warmup 5 --rounds 2
