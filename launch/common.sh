# shellcheck shell=bash disable=SC2034  # Its variables are for the scripts that source it.
# Sourced by the launch/ scripts, never run: the flags they share, the TPU generations, and the
# one place that calls gcloud (or prints the call, under --dry-run).

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# On every worker (in the ssh user's home): the code of one commit, its virtual environment, and
# the training run's log and process id. Single-quoted: the worker's shell expands the ~.
# shellcheck disable=SC2088
REMOTE_CODE='~/li-dit' REMOTE_VENV='~/li-dit-venv' REMOTE_LOG='~/li-dit-train.log' \
  REMOTE_PID='~/li-dit-train.pid'
# A remote shell condition: li_dit.train, started by train.sh, is still running on this worker.
REMOTE_RUNNING="[ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null"

# The TPU software version of a generation (the accelerator type's prefix), from
# https://cloud.google.com/tpu/docs/runtimes; nothing for an unknown one.
runtime_version() {
  case $1 in
    v4) echo tpu-ubuntu2204-base ;;
    v5litepod) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
  esac
}
ACCELERATOR_TYPES="v4-N (N TensorCores: 8 to 4096, a multiple of 8), v5litepod-N (v5e) or v6e-N
  (N chips: 1, 4, 8, 16, 32, 64, 128 or 256), v5p-N (N TensorCores: 8 to 12288, a multiple of 8)"

# Defaults of the flags every script takes; the project and zone fall back on gcloud's own
# environment variables (as gcloud itself would).
NAME='' SLICES=1 DRY_RUN=0
PROJECT=${CLOUDSDK_CORE_PROJECT:-}
ZONE=${CLOUDSDK_COMPUTE_ZONE:-}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# --help: the comment block at the top of the script.
usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

# Sets ARGS to the arguments with --flag=value split into --flag value, so the parsers see one
# form. --config.a.b=value overrides stay whole: they go to li_dit.train as they are.
split_equals() {
  ARGS=()
  local arg
  for arg; do
    case $arg in
      --config.*) ARGS+=("$arg") ;;
      --*=*) ARGS+=("${arg%%=*}" "${arg#*=}") ;;
      *) ARGS+=("$arg") ;;
    esac
  done
}

# Dies unless flag $1 has a value $2.
need_value() {
  [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"
}

# Parses one of the flags every script takes; sets SHIFT to the number of words it used.
common_flag() {
  case $1 in
    --name) need_value "$@"; NAME=$2; SHIFT=2 ;;
    --project) need_value "$@"; PROJECT=$2; SHIFT=2 ;;
    --zone) need_value "$@"; ZONE=$2; SHIFT=2 ;;
    --slices) need_value "$@"; SLICES=$2; SHIFT=2 ;;
    --dry-run) DRY_RUN=1; SHIFT=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
}

# Checks the shared flags (before any gcloud call) and sets NODES, the TPU VM of each slice: one
# slice is the VM NAME; N slices (a queued resource's --node-prefix NAME) are NAME-0 .. NAME-<N-1>.
check_common() {
  [[ -n $NAME ]] || die "--name is required (the TPU VM, or the queued resource and its slices)"
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name '$NAME': lowercase letters, digits and hyphens, starting with a letter"
  [[ -n $PROJECT ]] || die "--project is required (or set CLOUDSDK_CORE_PROJECT)"
  [[ -n $ZONE ]] || die "--zone is required (or set CLOUDSDK_COMPUTE_ZONE)"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die "--zone '$ZONE' is not a zone (e.g. us-central2-b: a region and a letter)"
  [[ $SLICES =~ ^[1-9][0-9]*$ ]] || die "--slices '$SLICES': a number of slices, 1 or more"
  NODES=()
  if ((SLICES == 1)); then
    NODES=("$NAME")
  else
    local i
    for ((i = 0; i < SLICES; i++)); do NODES+=("$NAME-$i"); done
  fi
}

# Dies unless $1 is a TPU accelerator type this table knows; sets GENERATION to its prefix.
check_accelerator() {
  local type=$1 size=${1##*-} ok=0
  GENERATION=${1%-*}
  if [[ $size =~ ^[1-9][0-9]*$ ]]; then
    case $GENERATION in
      v4) ((size % 8 == 0 && size <= 4096)) && ok=1 ;;
      v5p) ((size % 8 == 0 && size <= 12288)) && ok=1 ;;
      v5litepod | v6e) [[ " 1 4 8 16 32 64 128 256 " == *" $size "* ]] && ok=1 ;;
    esac
  fi
  ((ok)) || die "--accelerator '$type' is not a TPU accelerator type; expected $ACCELERATOR_TYPES"
}

# Runs `gcloud ARGS...`, or under --dry-run prints it, quoted to paste into a shell.
gcloud_run() {
  if ((DRY_RUN)); then
    printf 'gcloud'
    printf ' %q' "$@"
    printf '\n'
  else
    gcloud "$@"
  fi
}

# Whether `gcloud compute tpus KIND describe NAME` finds it (KIND: tpu-vm or queued-resources).
# Only gcloud's NOT_FOUND means "not there": any other failure (credentials, a disabled API, a
# wrong project) stops the script with gcloud's message. Not called under --dry-run.
exists() {
  local kind=$1 name=$2 err
  if err=$(gcloud compute tpus "$kind" describe "$name" --zone="$ZONE" --project="$PROJECT" \
    --format='value(name)' 2>&1 >/dev/null); then
    return 0
  fi
  [[ $err == *NOT_FOUND* ]] || die "gcloud compute tpus $kind describe $name failed: $err"
  return 1
}

# Runs the shell command $1 on every worker of every slice (the workers' login shell, bash,
# parses it: quote values with printf %q).
on_all_workers() {
  local node
  for node in ${NODES[@]+"${NODES[@]}"}; do
    gcloud_run compute tpus tpu-vm ssh "$node" --zone="$ZONE" --project="$PROJECT" --worker=all \
      --command="$1"
  done
}

# The flags of a script that acts on an existing job: the common ones and --queued. Sets QUEUED
# (1 also for several slices, which are always one queued resource) and checks the flags.
parse_flags_and_queued() {
  QUEUED=0
  split_equals "$@"
  set -- ${ARGS[@]+"${ARGS[@]}"}
  while (($#)); do
    case $1 in
      --queued) QUEUED=1; shift ;;
      *) common_flag "$@"; shift "$SHIFT" ;;
    esac
  done
  check_common
  ((SLICES == 1)) || QUEUED=1
}
