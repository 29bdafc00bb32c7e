#!/usr/bin/env bash
# CPU parity with the PyTorch peer: each engine's training step (n = 1 and n = 4) over
# its own bare matmul rate, engines alternated in one run, at the throughput benchmark's shape and
# at d_model 512 / vocab 8192 / batch 8 / seq 512. The last line is the JSON summary.
#   benchmarks/parity.sh [--shapes small,large] [--rounds 5] ...
# torch lives in its own virtual environment, never in this project's:
#   python -m venv ../torchvenv && ../torchvenv/bin/pip install torch numpy   # beside the checkout
set -euo pipefail
cd "$(dirname "$0")/.."
torch_py=${TORCH_PYTHON:-../torchvenv/bin/python}
if [ ! -x "$torch_py" ]; then
  echo "error: no torch interpreter at $torch_py; create the venv above or set TORCH_PYTHON" >&2
  exit 2
fi
exec python -m mtp_jax.benchmarks.parity --torch-python "$torch_py" "$@"
