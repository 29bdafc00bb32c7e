#!/usr/bin/env bash
# NPROC training processes on this machine, joined through jax.distributed on 127.0.0.1: the same
# code path as a multi-host cluster (coordinator, process ids, global mesh, cross-process
# collectives over gloo), on CPU devices. Use it to test multi-host behaviour on a laptop.
#
# Usage: launch/local_multiprocess.sh [--dry-run] -n NPROC -d DEVICES_PER_PROC CONFIG [dotted.key=value ...]
#   e.g. launch/local_multiprocess.sh -n 2 -d 4 experiments/quickstart.yaml mesh.dcn_data=2
#
# Each process i runs with XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROC,
# JAX_PLATFORMS=cpu, MTP_COORDINATOR=127.0.0.1:PORT, MTP_NUM_PROCESSES=NPROC, MTP_PROCESS_ID=i and
# writes LOG_DIR/process_i.log; process 0's output is also shown here. When any process fails, the
# others are stopped (SIGTERM, then SIGKILL after KILL_AFTER seconds) and this script exits with the
# failed process's status.
#
# Variables read:
#   PORT           coordinator port (default: a free port)
#   LOG_DIR        per-process logs (default: ${TMPDIR:-/tmp}/mtp_local_multiprocess.<pid>)
#   KILL_AFTER     seconds between SIGTERM and SIGKILL when stopping the others (default: 10)
#   XLA_FLAGS      kept; the device-count flag is appended
#   PYTHON         interpreter used to find a free port (default: python3)
#   MTP_TRAIN_CMD  the training command (default: mtp-train)
# --dry-run prints the commands, prefixed "+ ", instead of running them.
set -euo pipefail
USAGE="launch/local_multiprocess.sh [--dry-run] -n NPROC -d DEVICES_PER_PROC CONFIG [dotted.key=value ...]"
# shellcheck source=_common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NPROC="" DEVICES=""
while [[ $# -gt 0 ]]; do
  common_flag "$1" && { shift; continue; }
  case $1 in
    -n | -d)
      [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || usage 2 "$1 needs a positive integer"
      if [[ $1 == -n ]]; then NPROC=$2; else DEVICES=$2; fi
      shift 2
      ;;
    -*) usage 2 "unknown option $1" ;;
    *) break ;;
  esac
done
[[ -n $NPROC ]] || usage 2 "missing -n NPROC"
[[ -n $DEVICES ]] || usage 2 "missing -d DEVICES_PER_PROC"
[[ $# -ge 1 ]] || usage 2 "missing CONFIG"

free_port() {
  "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

PORT=${PORT:-$(free_port)}
LOG_DIR=${LOG_DIR:-${TMPDIR:-/tmp}/mtp_local_multiprocess.$$}
XLA="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES"
PIDS=()

# start I ARGS...: process I in the background, its output in its log (and here for process 0).
start() {
  local i=$1 log="$LOG_DIR/process_$1.log"
  shift
  local cmd=(env "XLA_FLAGS=$XLA" JAX_PLATFORMS=cpu "MTP_COORDINATOR=127.0.0.1:$PORT"
    "MTP_NUM_PROCESSES=$NPROC" "MTP_PROCESS_ID=$i" "${TRAIN_CMD[@]}" "$@")
  if ((DRY_RUN)); then
    if ((i == 0)); then echo "+ $(quote "${cmd[@]}") 2>&1 | tee $(quote "$log") &"; else echo "+ $(quote "${cmd[@]}") > $(quote "$log") 2>&1 &"; fi
    return
  fi
  if ((i == 0)); then
    "${cmd[@]}" > >(tee "$log") 2>&1 &
  else
    "${cmd[@]}" > "$log" 2>&1 &
  fi
  PIDS+=($!)
}

stop_all() {
  local pid waited=0
  # ${PIDS[@]+...}: an empty array is "unbound" under set -u in bash 3.2 (macOS)
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill -TERM "$pid" 2> /dev/null || true; done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    while ((waited < ${KILL_AFTER:-10})) && kill -0 "$pid" 2> /dev/null; do
      sleep 1
      waited=$((waited + 1))
    done
    kill -KILL "$pid" 2> /dev/null || true
  done
}

# wait_all: polls (portable to bash 3.2, no `wait -n`) until all succeed or one fails.
wait_all() {
  local i status running=1
  while ((running)); do
    running=0
    for i in "${!PIDS[@]}"; do
      if kill -0 "${PIDS[$i]}" 2> /dev/null; then
        running=1
      elif wait "${PIDS[$i]}"; then
        unset "PIDS[$i]"
      else
        status=$?
        echo "error: process $i exited with status $status (log: $LOG_DIR/process_$i.log); stopping the others" >&2
        exit "$status"
      fi
    done
    if ((running)); then sleep 1; fi
  done
  echo "all $NPROC processes finished; logs in $LOG_DIR" >&2
}

run mkdir -p "$LOG_DIR"
if ((!DRY_RUN)); then
  trap stop_all EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
fi
for ((i = 0; i < NPROC; i++)); do start "$i" "$@"; done
((DRY_RUN)) || wait_all
