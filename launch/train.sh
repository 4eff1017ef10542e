#!/usr/bin/env bash
# Starts `python -m li_dit.train` on every worker of the TPU VM(s), in the background.
#
#   launch/train.sh --name NAME [--project P] [--zone Z] [--slices N] --config FILE[:ARG]
#       --workdir gs://BUCKET/PATH [--config.a.b=VALUE ...] [--dry-run]
#
# --config   a config file of the repository, relative to its root, as committed (the workers
#            have the commit launch/setup.sh copied), e.g. configs/li_dit_10b.py:1024
# --workdir  the run's directory on Cloud Storage, shared by all workers; the same command
#            resumes from its latest checkpoint
# --config.a.b=VALUE  overrides, passed to li_dit.train word for word (spaces, quotes, commas
#            and = included: quote them for your own shell only)
# --slices N the N slices of a multi-slice queued resource (TPU VMs NAME-0 .. NAME-<N-1>)
# --dry-run  print the gcloud commands, run nothing
#
# Each worker runs it under nohup, logging to ~/li-dit-train.log (launch/logs.sh follows worker
# 0's), with this environment, each overridable by setting it here (empty: not set):
#   JAX_COMPILATION_CACHE_DIR  default gs://BUCKET/jax_compilation_cache (a restart or another
#                              run of the same shapes skips XLA's compile)
#   LIBTPU_INIT_ARGS           default: XLA's asynchronous collectives, overlapped with compute
#                              (FSDP all-gathers, data-parallel all-reduces)
# JAX finds the other workers and slices by itself (no --coordinator_address on TPU VMs).
# Safe to re-run: a worker where li_dit.train runs already says so and starts nothing.

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

CONFIG='' WORKDIR='' OVERRIDES=()
split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --config.*=*) OVERRIDES+=("$1"); shift ;;
    --config.*) die "override '$1' needs a value: $1=VALUE" ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done

check_common
[[ -n $CONFIG ]] || die "--config is required (e.g. configs/li_dit_1b.py)"
CONFIG_FILE=${CONFIG%%:*}
[[ $CONFIG_FILE != /* ]] || die "--config '$CONFIG': give the path relative to the repository root"
[[ -f $REPO/$CONFIG_FILE ]] || die "--config '$CONFIG': no file $REPO/$CONFIG_FILE"
git -C "$REPO" cat-file -e "HEAD:$CONFIG_FILE" 2>/dev/null ||
  die "--config '$CONFIG': $CONFIG_FILE is not committed, so the workers do not have it"
[[ $WORKDIR =~ ^gs://([a-z0-9][-_.a-z0-9]+[a-z0-9])/[^/] ]] ||
  die "--workdir '$WORKDIR': a Cloud Storage path gs://BUCKET/PATH (all workers write to it)"
BUCKET=${BASH_REMATCH[1]}

JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR-gs://$BUCKET/jax_compilation_cache}
# MaxText's flags for overlapping collectives with compute, on v4, v5e, v5p and v6e alike.
OVERLAP_COLLECTIVES=(
  --xla_tpu_enable_async_collective_fusion=true
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
  --xla_tpu_enable_async_collective_fusion_multiple_steps=true
  --xla_tpu_overlap_compute_collective_tc=true
  --xla_enable_async_all_gather=true
  --xla_tpu_enable_data_parallel_all_reduce_opt=true
  --xla_tpu_data_parallel_opt_different_sized_ops=true
)
LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS-${OVERLAP_COLLECTIVES[*]}}

ENVIRONMENT=''
for var in JAX_COMPILATION_CACHE_DIR LIBTPU_INIT_ARGS; do
  [[ -z ${!var} ]] || printf -v ENVIRONMENT '%sexport %s=%q\n' "$ENVIRONMENT" "$var" "${!var}"
done
# Every word quoted once for the worker's shell, which is the only one to parse this command.
printf -v TRAIN ' %q' -m li_dit.train --config "$CONFIG" --workdir "$WORKDIR" \
  ${OVERRIDES[@]+"${OVERRIDES[@]}"}
START="if ! cd $REMOTE_CODE; then echo \"\$(hostname): run launch/setup.sh first\" >&2; exit 1; fi
if $REMOTE_RUNNING; then
  echo \"\$(hostname): li_dit.train is running already (pid \$(cat $REMOTE_PID)); not starting\" \\
    \"another\"
  exit 0
fi
${ENVIRONMENT}nohup $REMOTE_VENV/bin/python$TRAIN >> $REMOTE_LOG 2>&1 < /dev/null &
echo \$! > $REMOTE_PID
echo \"\$(hostname): li_dit.train started (pid \$!), logging to $REMOTE_LOG\""

on_all_workers "$START"
