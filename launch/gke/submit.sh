#!/usr/bin/env bash
# Submits a training run to GKE: renders tpu-jobset.yaml or gpu-jobset.yaml (next to this script)
# into RENDER_DIR and applies it with kubectl, or, with --xpk, creates a TPU workload with xpk.
#
# Usage: launch/gke/submit.sh [--dry-run] [--xpk] {tpu|gpu} CONFIG [dotted.key=value ...]
#   e.g. IMAGE=us-docker.pkg.dev/p/r/mtp:latest TPU_TOPOLOGY=4x4x4 NUM_SLICES=2 \
#          launch/gke/submit.sh tpu experiments/paper/6.7b_n4.yaml mesh.dcn_data=2 mesh.data=1 mesh.fsdp=-1
#
# Variables read:
#   IMAGE            container image with mtp_jax (and jax[tpu] or jax[cuda12]) installed (required)
#   NAME             JobSet / workload name (default: mtp-tpu or mtp-gpu)
#   MAX_RESTARTS     JobSet restarts of the whole run after a failure (default: 0)
#   RENDER_DIR       where the rendered manifest is written (default: ${TMPDIR:-/tmp})
#   tpu:
#   TPU_ACCELERATOR  node selector, e.g. tpu-v5p-slice, tpu-v6e-slice (default: tpu-v5p-slice)
#   TPU_TOPOLOGY     slice topology, e.g. 2x2x2 (v5p-16), 4x4x4 (v5p-128) (default: 2x2x2)
#   CHIPS_PER_HOST   TPU chips per VM host (default: 4); hosts per slice = chips / CHIPS_PER_HOST
#   NUM_SLICES       slices, joined over the data-center network (default: 1)
#   gpu:
#   GPU_ACCELERATOR  node selector, e.g. nvidia-h100-80gb (default: nvidia-h100-80gb)
#   NUM_NODES        nodes, one pod each (default: 2)
#   GPUS_PER_NODE    (default: 8)
#   PORT             jax.distributed coordinator port (default: 1234)
#   --xpk (tpu only):
#   XPK_CLUSTER      the xpk cluster (required)
#   TPU_TYPE         xpk's --tpu-type, e.g. v5p-16 (default: v5p-16)
#   MTP_TRAIN_CMD    the training command (default: mtp-train)
# --dry-run prints the commands, prefixed "+ ", instead of running them (the manifest is still written).
set -euo pipefail
USAGE="launch/gke/submit.sh [--dry-run] [--xpk] {tpu|gpu} CONFIG [dotted.key=value ...]"
HERE=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=_common.sh source-path=SCRIPTDIR/..
source "$HERE/../_common.sh"

XPK=0
while [[ $# -gt 0 ]]; do
  common_flag "$1" && { shift; continue; }
  case $1 in
    --xpk) XPK=1 ; shift ;;
    -*) usage 2 "unknown option $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || usage 2 "missing {tpu|gpu} or CONFIG"
KIND=$1
shift
[[ $KIND == tpu || $KIND == gpu ]] || usage 2 "the first argument must be tpu or gpu, not '$KIND'"
((!XPK)) || [[ $KIND == tpu ]] || usage 2 "--xpk is for TPU; use the kubectl path for GPUs (it sets the MTP_* variables)"
need IMAGE

NAME=${NAME:-mtp-$KIND}
TRAIN_COMMAND=$(quote "${TRAIN_CMD[@]}" "$@")

# render FILE VAR...: FILE with each ${VAR} replaced by its value.
render() {
  local text var
  text=$(< "$1")
  shift
  for var in "$@"; do text=${text//"\${$var}"/"${!var}"}; done # quoted: no bash 5.2 "&" expansion
  printf '%s\n' "$text"
}

submit_xpk() {
  need XPK_CLUSTER
  run xpk workload create --cluster "$XPK_CLUSTER" --workload "$NAME" --docker-image "$IMAGE" \
    --tpu-type "${TPU_TYPE:-v5p-16}" --num-slices "${NUM_SLICES:-1}" --command "$TRAIN_COMMAND"
}

submit_kubectl() {
  local manifest=${RENDER_DIR:-${TMPDIR:-/tmp}}/$NAME.yaml vars
  MAX_RESTARTS=${MAX_RESTARTS:-0}
  if [[ $KIND == tpu ]]; then
    TPU_ACCELERATOR=${TPU_ACCELERATOR:-tpu-v5p-slice} TPU_TOPOLOGY=${TPU_TOPOLOGY:-2x2x2}
    CHIPS_PER_HOST=${CHIPS_PER_HOST:-4} NUM_SLICES=${NUM_SLICES:-1}
    [[ $TPU_TOPOLOGY =~ ^[0-9]+(x[0-9]+)*$ ]] || die "TPU_TOPOLOGY='$TPU_TOPOLOGY' must look like 2x2x2"
    HOSTS_PER_SLICE=$(($(tr x '*' <<< "$TPU_TOPOLOGY") / CHIPS_PER_HOST))
    ((HOSTS_PER_SLICE >= 1)) || HOSTS_PER_SLICE=1 # a single-host slice with fewer chips than CHIPS_PER_HOST
    vars=(TPU_ACCELERATOR TPU_TOPOLOGY CHIPS_PER_HOST NUM_SLICES HOSTS_PER_SLICE)
  else
    GPU_ACCELERATOR=${GPU_ACCELERATOR:-nvidia-h100-80gb} NUM_NODES=${NUM_NODES:-2}
    GPUS_PER_NODE=${GPUS_PER_NODE:-8} PORT=${PORT:-1234}
    vars=(GPU_ACCELERATOR NUM_NODES GPUS_PER_NODE PORT)
  fi
  render "$HERE/$KIND-jobset.yaml" NAME IMAGE MAX_RESTARTS TRAIN_COMMAND "${vars[@]}" > "$manifest"
  echo "manifest: $manifest" >&2
  run kubectl apply -f "$manifest"
}

if ((XPK)); then submit_xpk; else submit_kubectl; fi
