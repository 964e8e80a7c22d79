#!/bin/bash
# Trains on a Cloud TPU VM slice until the run is done, spot VMs included:
# creates the slice when it is missing (a preempted spot TPU VM is gone, or
# left PREEMPTED and deleted here), runs train.py on every worker, and
# starts over while the run asks to be rerun (exit 75: it saved a
# checkpoint after SIGTERM) or the slice went away under it. A rerun
# resumes from the workdir.
#
#   TPU_NAME=mnist ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   REPO=https://example.com/you/mnist_resnet.git \
#   WORKDIR=gs://BUCKET/runs/tpu bash tools/tpu_vm.sh [--config.KEY=VALUE ...]
#
# Config:  CONFIG, default configs/tpu.py (bfloat16, global batch 2048).
# Workdir: WORKDIR, a gs:// location every worker can write; it outlives the
#          VMs, so keep it fixed.
# Data:    data/mnist in each worker's checkout, downloaded at the first
#          start on each new VM (the workers reach the network).
# Code:    REPO is cloned on each worker at the first start on a new VM, with
#          requirements.txt and "jax[tpu]" in .venv there.
# Slice:   created with `gcloud compute tpus tpu-vm create ... --spot`
#          (SPOT=0: on demand; RUNTIME_VERSION: the TPU software version).
#          A creation refused for lack of capacity is tried again after
#          RETRY_SECONDS, up to MAX_ATTEMPTS starts in all.
# The script exits 0 once the run is done, with train.py's code when it
# failed on a slice that is still there (2: a user error), or 1 after
# MAX_ATTEMPTS.

set -u
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE}" "${REPO:?set REPO (git URL)}"
: "${WORKDIR:?set WORKDIR (gs://BUCKET/PATH)}"
CONFIG=${CONFIG:-configs/tpu.py}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
SPOT=${SPOT:-1}
RETRY_SECONDS=${RETRY_SECONDS:-120}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-50}
EXIT_PREEMPTED=75

say() { echo "tpu_vm.sh: $*" >&2; }

slice_state() {
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
      --format='value(state)' 2>/dev/null
}

create_slice() {
  local spot=()
  [ "$SPOT" = 1 ] && spot=(--spot)
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
      "${spot[@]}"
}

# Makes the slice READY; fails when it cannot now (no capacity, still
# being created or deleted).
ensure_slice() {
  local state
  state=$(slice_state)
  case "$state" in
    READY) return 0 ;;
    "") say "no slice $TPU_NAME: creating it"; create_slice ;;
    PREEMPTED|TERMINATED|STOPPED)
      say "slice $TPU_NAME is $state: deleting and recreating it"
      gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet &&
          create_slice ;;
    *) say "slice $TPU_NAME is $state"; return 1 ;;
  esac
}

# Every worker: the checkout and its venv on a new VM, then the command.
args=$(printf ' %q' "$@")
worker_command="set -e; [ -d mnist_resnet ] || git clone -q $(printf %q "$REPO") mnist_resnet
cd mnist_resnet
[ -x .venv/bin/python ] || { python3 -m venv .venv &&
  .venv/bin/pip install -q -r requirements.txt 'jax[tpu]'; }
.venv/bin/python train.py --config=$(printf %q "$CONFIG") --workdir=$(printf %q "$WORKDIR")$args"

for attempt in $(seq 1 "$MAX_ATTEMPTS"); do
  if ! ensure_slice; then
    say "attempt $attempt: no slice yet; trying again in ${RETRY_SECONDS}s"
    sleep "$RETRY_SECONDS"
    continue
  fi
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
      --command="$worker_command"
  code=$?
  if [ "$code" -eq 0 ]; then
    say "done"
    exit 0
  elif [ "$code" -eq "$EXIT_PREEMPTED" ]; then
    say "stopped at a checkpoint (exit 75): rerunning"
  elif [ "$(slice_state)" != READY ]; then
    say "exit $code and the slice is gone or stopped: recreating it"
  else
    say "train.py failed with exit $code on a running slice"
    exit "$code"
  fi
done
say "gave up after $MAX_ATTEMPTS attempts"
exit 1
