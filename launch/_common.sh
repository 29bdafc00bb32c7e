# shellcheck shell=bash disable=SC2034  # DRY_RUN and TRAIN_CMD are read by the scripts sourcing this
# Helpers shared by the launch/ scripts; sourced, never run. Each script sets USAGE before sourcing.
#
# Variables read:
#   MTP_TRAIN_CMD  the training command, split on spaces (default: mtp-train;
#                  e.g. "python -m mtp_jax.cli train" where the console script is not on PATH)

DRY_RUN=0
read -r -a TRAIN_CMD <<< "${MTP_TRAIN_CMD:-mtp-train}"

# usage [STATUS [MESSAGE]]: the usage line (and why), then exit; 0 prints to stdout for --help.
usage() {
  local status=${1:-2}
  if [[ $status == 0 ]]; then
    echo "usage: $USAGE"
  else
    [[ -n ${2:-} ]] && echo "error: $2" >&2
    echo "usage: $USAGE" >&2
  fi
  exit "$status"
}

# die MESSAGE: one error line, exit 2 (the code mtp-train uses for user errors).
die() {
  echo "error: $*" >&2
  exit 2
}

# need VAR...: dies naming the first required variable that is empty.
need() {
  local var
  for var in "$@"; do
    [[ -n ${!var:-} ]] || die "$var is not set; see the header of $0"
  done
}

# quote ARG...: the arguments as one shell-safe line (what --dry-run shows); single quotes only
# where needed, which reads better than printf %q's backslashes.
quote() {
  local arg out=() escaped="'\\''"
  for arg in "$@"; do
    if [[ -n $arg && $arg != *[!A-Za-z0-9_./:=@%+,-]* ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/"$escaped"}'")
    fi
  done
  local IFS=' '
  echo "${out[*]}"
}

# run CMD...: prints "+ CMD" under --dry-run, otherwise runs it.
run() {
  if ((DRY_RUN)); then
    echo "+ $(quote "$@")"
  else
    "$@"
  fi
}

# common_flag ARG: handles --dry-run and -h/--help; fails for anything else.
common_flag() {
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage 0 ;;
    *) return 1 ;;
  esac
}
