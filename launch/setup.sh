#!/usr/bin/env bash
# Puts the code of the current commit (HEAD) on every worker of the TPU VM(s) and installs it
# with jax[tpu] into a virtual environment there.
#
#   launch/setup.sh --name NAME [--project P] [--zone Z] [--slices N] [--python PY]
#       [--allow-dirty] [--dry-run]
#
# The commit goes as a `git archive` of HEAD, copied with `gcloud compute tpus tpu-vm scp
# --worker=all` and unpacked into ~/li-dit (replacing what was there; ~/li-dit/COMMIT names the
# commit); `pip install -e '~/li-dit[tpu]'` into the venv ~/li-dit-venv (made once, with PY:
# python3.11 by default, which li-dit needs; apt-get installs it and its venv module when the
# image lacks them).
# --allow-dirty  copy HEAD although the working tree has uncommitted changes (they do not go)
# --slices N     the N slices of a multi-slice queued resource (TPU VMs NAME-0 .. NAME-<N-1>)
# --dry-run      print the gcloud commands, run nothing
#
# Safe to re-run (e.g. after a new commit); refuses while li_dit.train runs on a worker.

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

PYTHON=python3.11 ALLOW_DIRTY=0
split_equals "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while (($#)); do
  case $1 in
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --allow-dirty) ALLOW_DIRTY=1; shift ;;
    *) common_flag "$@"; shift "$SHIFT" ;;
  esac
done

check_common
[[ $PYTHON =~ ^python3\.[0-9]+$ ]] ||
  die "--python '$PYTHON': python3.N (the interpreter and its apt package)"
COMMIT=$(git -C "$REPO" rev-parse HEAD)
if ! git -C "$REPO" diff --quiet HEAD; then
  ((ALLOW_DIRTY)) || die "$REPO has uncommitted changes, which would not reach the workers:
  commit them, or pass --allow-dirty to copy HEAD ($COMMIT) without them"
  echo "warning: uncommitted changes in $REPO stay here; the workers get HEAD ($COMMIT)" >&2
fi

ARCHIVE=${TMPDIR:-/tmp}/li-dit-$COMMIT.tar.gz
UPLOAD=li-dit.tar.gz  # In the worker's home.
# torch (a dependency of the base install) from PyTorch's CPU index: PyPI's Linux wheel pulls
# gigabytes of CUDA libraries a TPU VM has no use for.
SETUP="set -euo pipefail
if $REMOTE_RUNNING; then
  echo \"\$(hostname): li_dit.train is running; stop it first (launch/stop.sh)\" >&2
  exit 1
fi
if ! $PYTHON -c 'import ensurepip, venv' >/dev/null 2>&1; then
  sudo apt-get update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $PYTHON $PYTHON-venv
fi
rm -rf $REMOTE_CODE && mkdir -p $REMOTE_CODE && tar -xzf ~/$UPLOAD -C $REMOTE_CODE
rm ~/$UPLOAD && echo $COMMIT > $REMOTE_CODE/COMMIT
[ -x $REMOTE_VENV/bin/python ] || $PYTHON -m venv $REMOTE_VENV
$REMOTE_VENV/bin/pip install -q --upgrade pip
$REMOTE_VENV/bin/pip install -q --extra-index-url https://download.pytorch.org/whl/cpu \\
  -e $REMOTE_CODE'[tpu]'
echo \"\$(hostname): li-dit $COMMIT installed in $REMOTE_VENV\""

if ((!DRY_RUN)); then
  trap 'rm -f "$ARCHIVE"' EXIT
  git -C "$REPO" archive --format=tar.gz --output="$ARCHIVE" HEAD
fi
for node in "${NODES[@]}"; do
  gcloud_run compute tpus tpu-vm scp "$ARCHIVE" "$node:$UPLOAD" --zone="$ZONE" \
    --project="$PROJECT" --worker=all
done
on_all_workers "$SETUP"
