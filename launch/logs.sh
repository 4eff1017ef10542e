#!/usr/bin/env bash
# Follows the training log of worker 0 (of slice 0): process 0, the one that prints the progress
# lines. Ctrl-C stops following; training goes on.
#
#   launch/logs.sh --name NAME [--project P] [--zone Z] [--slices N] [--lines K] [--dry-run]
#
# --lines K   start with the log's last K lines (default 100)
# --slices N  the N slices of a multi-slice queued resource (worker 0 of NAME-0)
# --dry-run   print the gcloud command, run nothing

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

LINES=100
split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --lines) need_value "$@"; LINES=$2; shift 2 ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done

check_common
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines '$LINES': a number of lines"
# -F: follow the file by name, also through a restart of training, which appends to it.
gcloud_run compute tpus tpu-vm ssh "${NODES[0]}" --zone="$ZONE" --project="$PROJECT" --worker=0 \
  --command="tail -n $LINES -F $REMOTE_LOG"
