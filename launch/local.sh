#!/usr/bin/env bash
# One training process on this machine (laptop, workstation, single GPU/TPU host).
#
# Usage: launch/local.sh [--dry-run] CONFIG [dotted.key=value ...]
#   e.g. launch/local.sh experiments/quickstart.yaml train.steps=100
#
# Variables read:
#   MTP_TRAIN_CMD  the training command (default: mtp-train)
# --dry-run prints the command, prefixed "+ ", instead of running it.
set -euo pipefail
USAGE="launch/local.sh [--dry-run] CONFIG [dotted.key=value ...]"
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

while [[ $# -gt 0 ]] && common_flag "$1"; do shift; done
[[ $# -ge 1 ]] || usage 2 "missing CONFIG"
[[ $1 != -* ]] || usage 2 "unknown option $1"

run "${TRAIN_CMD[@]}" "$@"
