#!/usr/bin/env bash
# Shows the state of the TPU VM(s) (and of their queued resource), and on every worker whether
# li_dit.train runs, the commit installed and the log's last line.
#
#   launch/status.sh --name NAME [--project P] [--zone Z] [--queued] [--slices N] [--dry-run]
#
# --queued    NAME is a queued resource (launch/create.sh --queued, or --slices N)
# --slices N  the N slices of a multi-slice queued resource (TPU VMs NAME-0 .. NAME-<N-1>)
# --dry-run   print the gcloud commands, run nothing

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

parse_flags_and_queued "$@"
LOCATION=(--zone="$ZONE" --project="$PROJECT")
if ((QUEUED)); then
  # WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE (its TPU VMs exist), FAILED, SUSPENDED, ...
  gcloud_run compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" \
    --format='value(name.basename(),state.state)' || true
fi
# The workers of READY TPU VMs answer ssh; the others (missing, CREATING, PREEMPTED, ...) are
# only described.
READY=()
for node in "${NODES[@]}"; do
  if described=$(gcloud_run compute tpus tpu-vm describe "$node" "${LOCATION[@]}" \
    --format='value(name.basename(),acceleratorType,state,health)'); then
    echo "$described"
    if ((DRY_RUN)) || [[ $described =~ (^|[[:space:]])READY([[:space:]]|$) ]]; then
      READY+=("$node")
    fi
  fi
done
NODES=(${READY[@]+"${READY[@]}"})
on_all_workers "if $REMOTE_RUNNING; then state=\"running (pid \$(cat $REMOTE_PID))\"
else state='not running'; fi
commit=\$(cat $REMOTE_CODE/COMMIT 2>/dev/null || echo none)
echo \"\$(hostname): li_dit.train \$state; commit \$commit\"
echo \"  \$(tail -n 1 $REMOTE_LOG 2>/dev/null)\""
