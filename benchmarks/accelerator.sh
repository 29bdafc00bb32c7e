#!/usr/bin/env bash
# The accelerator check: on one GPU or TPU host, in at most 8 minutes, prints JSON with
# bf16 training tokens/s and MFU for n = 1 vs n = 4, the attention implementation `auto` picks and
# its memory at T = 4096 and 8192, and decode pass costs. The last line is the JSON summary.
#   benchmarks/accelerator.sh                      # on the accelerator host
#   benchmarks/accelerator.sh --platform cpu --tiny  # CI smoke run at toy shapes
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python -m mtp_jax.benchmarks.accelerator "$@"
