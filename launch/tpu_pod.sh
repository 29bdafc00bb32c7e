#!/usr/bin/env bash
# A Cloud TPU VM (single host or pod slice) driven through gcloud: every worker runs the same
# mtp-train, and mtp_jax.distributed detects the pod by itself (no MTP_* variables needed).
#
# Usage: launch/tpu_pod.sh [--dry-run] {create|install|run|logs|delete}
#   create   create the TPU VM, or reuse it if it already exists
#   install  put this repo on every worker (REPO_URL clone, or a tarball of this checkout) and pip install it
#   run      start CONFIG + OVERRIDES on all workers in the background, then stream worker 0's log
#   logs     stream worker 0's log (Ctrl-C stops the stream, not the run)
#   delete   delete the TPU VM
#   e.g. TPU_NAME=mtp ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 launch/tpu_pod.sh create
#        TPU_NAME=mtp ZONE=us-east5-a CONFIG=experiments/paper/1.3b_n4.yaml \
#          OVERRIDES="mesh.data=1 mesh.fsdp=-1 train.run_dir=/mnt/runs/1.3b" launch/tpu_pod.sh run
#
# Variables read:
#   TPU_NAME          TPU VM name (required)
#   ZONE              e.g. us-east5-a (required)
#   PROJECT           GCP project (default: gcloud's configured project)
#   ACCELERATOR_TYPE  create: slice type, e.g. v5p-8, v5p-64, v6e-16 (default: v5p-8)
#   RUNTIME_VERSION   create: TPU software version (default: v2-alpha-tpuv5; v6e: v2-alpha-tpuv6e)
#   CREATE_FLAGS      create: extra gcloud flags, e.g. "--spot"
#   REPO_URL          install: git URL to clone on the workers (default: copy this checkout by scp)
#   REMOTE_DIR        install/run: repo directory on the workers (default: mtp_jax)
#   CONFIG            run: experiment YAML, relative to the repo (default: experiments/quickstart.yaml)
#   OVERRIDES         run: space-separated dotted.key=value overrides
#   MTP_TRAIN_CMD     run: the training command (default: mtp-train)
# --dry-run prints the commands, prefixed "+ ", instead of running them.
set -euo pipefail
USAGE="launch/tpu_pod.sh [--dry-run] {create|install|run|logs|delete}"
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

while [[ $# -gt 0 ]] && common_flag "$1"; do shift; done
[[ $# -eq 1 ]] || usage 2 "give exactly one action"
ACTION=$1
need TPU_NAME ZONE

REMOTE_DIR=${REMOTE_DIR:-mtp_jax}
LOG=mtp_train.log # in each worker's home directory
SCOPE=(--zone "$ZONE")
[[ -z ${PROJECT:-} ]] || SCOPE+=(--project "$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

# on_workers WORKERS COMMAND: runs a shell command over ssh on "all" workers or one.
on_workers() {
  run "${TPU[@]}" ssh "$TPU_NAME" "${SCOPE[@]}" --worker="$1" --command="$2"
}

create_vm() {
  local extra
  read -r -a extra <<< "${CREATE_FLAGS:-}"
  if ((!DRY_RUN)) && "${TPU[@]}" describe "$TPU_NAME" "${SCOPE[@]}" > /dev/null 2>&1; then
    echo "reusing the existing TPU VM $TPU_NAME" >&2
    return
  fi
  run "${TPU[@]}" create "$TPU_NAME" "${SCOPE[@]}" --accelerator-type="${ACCELERATOR_TYPE:-v5p-8}" \
    --version="${RUNTIME_VERSION:-v2-alpha-tpuv5}" ${extra[@]+"${extra[@]}"}
}

install_repo() {
  local fetch tarball=${TMPDIR:-/tmp}/mtp_jax_src.tar.gz
  if [[ -n ${REPO_URL:-} ]]; then
    fetch="rm -rf $(quote "$REMOTE_DIR") && git clone $(quote "$REPO_URL") $(quote "$REMOTE_DIR")"
  else
    # tracked and untracked-but-not-ignored files: the working tree as it is, without runs/ or venvs
    if ((DRY_RUN)); then
      echo "+ git ls-files -co --exclude-standard | tar czf $(quote "$tarball") -T -"
    else
      git -C "$(dirname "${BASH_SOURCE[0]}")/.." ls-files -co --exclude-standard -z |
        tar czf "$tarball" -C "$(dirname "${BASH_SOURCE[0]}")/.." --null -T -
    fi
    run "${TPU[@]}" scp "$tarball" "$TPU_NAME:mtp_jax_src.tar.gz" "${SCOPE[@]}" --worker=all
    fetch="rm -rf $(quote "$REMOTE_DIR") && mkdir -p $(quote "$REMOTE_DIR") && tar xzf mtp_jax_src.tar.gz -C $(quote "$REMOTE_DIR")"
  fi
  on_workers all "$fetch && python3 -m pip install -U 'jax[tpu]' && python3 -m pip install -e $(quote "$REMOTE_DIR")"
}

start_run() {
  local overrides train
  read -r -a overrides <<< "${OVERRIDES:-}"
  train=$(quote "${TRAIN_CMD[@]}" "${CONFIG:-experiments/quickstart.yaml}" ${overrides[@]+"${overrides[@]}"})
  # setsid + nohup: the run outlives the ssh session; ~/.local/bin holds pip's console scripts
  on_workers all "cd $(quote "$REMOTE_DIR") && PATH=\$HOME/.local/bin:\$PATH setsid nohup $train > ~/$LOG 2>&1 < /dev/null &"
  stream_logs
}

stream_logs() {
  on_workers 0 "tail -n +1 -F ~/$LOG"
}

delete_vm() {
  run "${TPU[@]}" delete "$TPU_NAME" "${SCOPE[@]}" --quiet
}

case $ACTION in
  create) create_vm ;;
  install) install_repo ;;
  run) start_run ;;
  logs) stream_logs ;;
  delete) delete_vm ;;
  *) usage 2 "unknown action '$ACTION'" ;;
esac
