#!/usr/bin/env bash
# Stops training on every worker with SIGTERM: li_dit.train finishes its current step, saves a
# checkpoint (all processes agree on the step) and exits; launch/train.sh resumes from it.
#
#   launch/stop.sh --name NAME [--project P] [--zone Z] [--slices N] [--dry-run]
#
# --slices N  the N slices of a multi-slice queued resource (TPU VMs NAME-0 .. NAME-<N-1>)
# --dry-run   print the gcloud commands, run nothing
#
# launch/logs.sh shows "stopped at step N after SIGTERM; checkpoint saved" when it is done. The
# TPU VMs stay (and cost): launch/delete.sh removes them. Safe to re-run.

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  common_flag "$@"
  shift "$SHIFT"
done

check_common
on_all_workers "if $REMOTE_RUNNING; then
  kill -TERM \"\$(cat $REMOTE_PID)\"
  echo \"\$(hostname): SIGTERM sent; li_dit.train checkpoints after its current step, then exits\"
else
  echo \"\$(hostname): li_dit.train is not running\"
fi"
