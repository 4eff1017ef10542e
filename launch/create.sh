#!/usr/bin/env bash
# Creates a TPU VM or pod slice, or requests one or several slices as a queued resource.
#
#   launch/create.sh --name NAME --accelerator TYPE [--project P] [--zone Z] [--version V]
#       [--spot] [--queued [--best-effort]] [--slices N] [--dry-run]
#
# --accelerator  v4-8 .. v4-4096, v5litepod-1 .. v5litepod-256 (v5e), v5p-8 .. v5p-12288,
#                v6e-1 .. v6e-256 (see launch/README.md)
# --version      TPU software version; default by generation: v4 tpu-ubuntu2204-base, v5e
#                v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
# --spot         Spot capacity (preemptible, cheaper): training resumes from its checkpoints
# --queued       a queued resource NAME (waits in the queue for capacity; launch/status.sh shows
#                its state) holding the TPU VM NAME
# --best-effort  the best-effort tier of queued resources (gcloud alpha)
# --slices N     N slices over DCN (multi-slice, always queued): TPU VMs NAME-0 .. NAME-<N-1>
# --project, --zone  default to $CLOUDSDK_CORE_PROJECT, $CLOUDSDK_COMPUTE_ZONE
# --dry-run      print the gcloud commands, run nothing
#
# Safe to re-run: when NAME exists already, says so and changes nothing.

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

ACCELERATOR='' VERSION='' SPOT=0 QUEUED=0 BEST_EFFORT=0
split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --accelerator) need_value "$@"; ACCELERATOR=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --best-effort) BEST_EFFORT=1; shift ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done

check_common
[[ -n $ACCELERATOR ]] || die "--accelerator is required, one of $ACCELERATOR_TYPES"
check_accelerator "$ACCELERATOR"
VERSION=${VERSION:-$(runtime_version "$GENERATION")}
# Multi-slice capacity comes only through queued resources.
((SLICES == 1)) || QUEUED=1
((!BEST_EFFORT || QUEUED)) || die "--best-effort is a tier of queued resources: add --queued"
((!(BEST_EFFORT && SPOT))) || die "--spot and --best-effort exclude each other"

LOCATION=(--zone="$ZONE" --project="$PROJECT")
if ((QUEUED)); then
  KIND=queued-resources
  CREATE=(compute tpus queued-resources create "$NAME" "${LOCATION[@]}"
    --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION")
  if ((SLICES == 1)); then
    CREATE+=(--node-id="$NAME")
  else
    CREATE+=(--node-count="$SLICES" --node-prefix="$NAME")
  fi
  ((!BEST_EFFORT)) || CREATE=(alpha "${CREATE[@]}" --best-effort)
else
  KIND=tpu-vm
  CREATE=(compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR"
    --version="$VERSION")
fi
((!SPOT)) || CREATE+=(--spot)

if ((!DRY_RUN)) && exists "$KIND" "$NAME"; then
  echo "$KIND $NAME exists already in $ZONE (project $PROJECT): nothing to create"
  exit 0
fi
gcloud_run "${CREATE[@]}"
if ((QUEUED && !DRY_RUN)); then
  echo "queued: launch/status.sh --name $NAME --queued --slices $SLICES shows when it is ACTIVE"
fi
