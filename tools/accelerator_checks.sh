#!/usr/bin/env bash
# The accelerator checks, most important first, as JSON lines on stdout:
#
#   bash tools/accelerator_checks.sh DATA_DIR OUT_DIR [PEER_TORCH_PY]
#
#   1. train.py, configs/smoke.py, device pipeline: runs end to end with no
#      TensorFlow installed (results.json, compact);
#   2. configs/scratch.py for 3 epochs, device pipeline (results.json);
#   3. the benchmark, step and train modes with the device pipeline, bf16:
#      32x32 at batch 1024, then 224x224 at batch 256 (step, train and
#      loop_efficiency lines);
#   4. the PyTorch peer at the same sizes and precision, if PEER_TORCH_PY
#      (e.g. ../shared/bench/peer_torch.py) is given and torch imports;
#   5. deterministic XLA ops: the benchmark at 32x32 batch 1024 with
#      --config.deterministic=true, to compare with 3.
#
# Each check runs under its own time limit (CHECK_SECONDS, default 150),
# so a slow one never eats the next one's time; a failed or timed-out check
# prints {"check": ..., "failed": exit code} and the next one runs. Logs
# go to OUT_DIR/<check>.log. On a short-lived machine, run it once with
# ACCELERATOR_CHECKS_QUICK=1 on a CPU first: every check then runs a few
# steps of the tiny model, which tries the whole script in about 5 minutes.
set -u

if [[ $# -lt 2 ]]; then
  echo "usage: bash tools/accelerator_checks.sh DATA_DIR OUT_DIR [PEER_TORCH_PY]" >&2
  exit 2
fi
DATA_DIR=$1
OUT_DIR=$2
PEER=${3:-}
PYTHON=${PYTHON:-python3}
LIMIT=${CHECK_SECONDS:-150}
mkdir -p "$OUT_DIR" || exit 2
cd "$(dirname "$0")/.." || exit 2

QUICK=()
BENCH_QUICK=()
SIZES=("32 1024" "224 256")
PEER_STEPS=20
if [[ ${ACCELERATOR_CHECKS_QUICK:-0} == 1 ]]; then
  QUICK=(--config.num_train_steps=12 --config.model=resnet_tiny)
  BENCH_QUICK=(--config.model=resnet_tiny --config.bench_steps=2
               --config.bench_warmup_steps=1)
  SIZES=("32 64" "64 32")
  PEER_STEPS=2
fi

# check NAME COMMAND...: runs COMMAND under the time limit; its stdout (JSON
# lines) goes to stdout, its stderr to OUT_DIR/NAME.log.
check() {
  local name=$1
  shift
  local start=$SECONDS
  timeout --signal=TERM --kill-after=20 "$LIMIT" "$@" 2>"$OUT_DIR/$name.log"
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "{\"check\": \"$name\", \"failed\": $rc, \"seconds\": $((SECONDS - start)), \"log\": \"$OUT_DIR/$name.log\"}"
  fi
}

# results.json of a finished run as one line, with the check's name.
results_line() {
  "$PYTHON" -c 'import json, sys
r = json.load(open(sys.argv[2] + "/results.json"))
r.pop("config", None)
print(json.dumps({"check": sys.argv[1], **r}))' "$1" "$2"
}

# train_check NAME CONFIG_FILE [OVERRIDES...]: a fresh run of train.py.
train_check() {
  local name=$1 config=$2
  shift 2
  local workdir=$OUT_DIR/$name
  rm -rf "$workdir"
  # --config must come before its overrides.
  check "$name" "$PYTHON" train.py --config="$config" --workdir="$workdir" \
    --config.data_dir="$DATA_DIR" --config.input_pipeline=device \
    --config.download=false "$@" && results_line "$name" "$workdir"
}

bench() {
  local name=$1 size=$2 batch=$3
  shift 3
  check "$name" "$PYTHON" -m mnist_resnet.benchmark \
    --config=configs/benchmark.py:gpu --config.data_dir="$DATA_DIR" \
    --config.input_pipelines=device --config.mode=all \
    --config.image_size="$size" --config.batch_size="$batch" \
    "${BENCH_QUICK[@]}" "$@"
}

"$PYTHON" -c 'import jax, json
print(json.dumps({"check": "devices", "jax": jax.__version__,
                  "backend": jax.default_backend(),
                  "devices": [d.device_kind for d in jax.devices()]}))'

train_check smoke configs/smoke.py "${QUICK[@]}"
train_check scratch_3_epochs configs/scratch.py --config.num_epochs=3 "${QUICK[@]}"

for sb in "${SIZES[@]}"; do
  read -r size batch <<<"$sb"
  bench "bench_${size}px_b${batch}" "$size" "$batch"
done

if [[ -n $PEER ]] && "$PYTHON" -c 'import torch' 2>/dev/null; then
  for sb in "${SIZES[@]}"; do
    read -r size batch <<<"$sb"
    check "peer_torch_${size}px_b${batch}" "$PYTHON" "$PEER" --bf16 \
      --channels_last --batch "$batch" --image_size "$size" --steps "$PEER_STEPS"
  done
elif [[ -n $PEER ]]; then
  echo '{"check": "peer_torch", "skipped": "torch does not import here"}'
fi

read -r size batch <<<"${SIZES[0]}"
bench "bench_${size}px_b${batch}_deterministic" "$size" "$batch" \
  --config.deterministic=true
