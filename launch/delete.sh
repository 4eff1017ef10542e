#!/usr/bin/env bash
# Deletes the TPU VM(s), or the queued resource with its slices. Whatever runs on them stops at
# once: launch/stop.sh first saves a checkpoint.
#
#   launch/delete.sh --name NAME [--project P] [--zone Z] [--queued] [--slices N] [--dry-run]
#
# --queued    NAME is a queued resource (launch/create.sh --queued, or --slices N): it goes
#             with its TPU VMs (--force)
# --slices N  the N slices of a multi-slice queued resource
# --dry-run   print the gcloud commands, run nothing
#
# Safe to re-run: what is gone already is said so and skipped.

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

parse_flags_and_queued "$@"
if ((QUEUED)); then
  KIND=queued-resources FORCE=(--force)
else
  KIND=tpu-vm FORCE=()
fi
if ((!DRY_RUN)) && ! exists "$KIND" "$NAME"; then
  echo "$KIND $NAME does not exist in $ZONE (project $PROJECT): nothing to delete"
  exit 0
fi
gcloud_run compute tpus "$KIND" delete "$NAME" --zone="$ZONE" --project="$PROJECT" \
  ${FORCE[@]+"${FORCE[@]}"} --quiet
