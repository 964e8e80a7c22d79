#!/usr/bin/env bash
# The accelerator checks, most important first, as JSON lines on stdout:
#
#   bash tools/accelerator_checks.sh DATA_DIR OUT_DIR [PEER_TORCH_PY]
#
#   1. train.py, configs/smoke.py, device pipeline: runs end to end with no
#      TensorFlow installed (results.json, compact);
#   2. time to accuracy: configs/large_batch.py to 99.5% on held-out
#      validation images, seeds 0 and 1 (the benchmark's target mode: a
#      line per seed with seconds_to_target, then their median and range);
#   3. two identical deterministic runs of configs/smoke.py: the same
#      params_sha256 or not ({"check": "deterministic_repeat", ...});
#   4. configs/scratch.py as shipped, device pipeline (results.json);
#   5. the benchmark, step and train modes with the device pipeline, bf16:
#      32x32 at batch 1024, then 224x224 at batch 256 (step, train and
#      loop_efficiency lines);
#   6. the PyTorch peer at the same sizes and precision, if PEER_TORCH_PY
#      (e.g. ../shared/bench/peer_torch.py) is given and torch imports;
#   7. the step mode at 32x32 batch 1024 with conv_as_dot never, then with
#      deterministic XLA ops, to compare with 5;
#   8. configs/scratch.py for 10 epochs (more epochs than the CPU can give).
#
# Each check runs under its own time limit, and all of them under
# DEADLINE_SECONDS (default 0: none): a check that cannot have its minimum
# time before the deadline is skipped, so the script ends by itself and its
# logs come back. A failed or timed-out check prints {"check": ...,
# "failed": exit code} and its log's last lines, and the next one runs.
# Logs go to OUT_DIR/<check>.log, and all of them into OUT_DIR/logs.tgz at
# the end. On a short-lived machine, run it once with
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
DEADLINE=${DEADLINE_SECONDS:-0}
mkdir -p "$OUT_DIR" || exit 2
cd "$(dirname "$0")/.." || exit 2

QUICK=()
BENCH_QUICK=()
TARGET_QUICK=()
SIZES=("32 1024" "224 256")
PEER_STEPS=20
if [[ ${ACCELERATOR_CHECKS_QUICK:-0} == 1 ]]; then
  QUICK=(--config.num_train_steps=12 --config.model=resnet_tiny)
  BENCH_QUICK=(--config.model=resnet_tiny --config.bench_steps=2
               --config.bench_warmup_steps=1)
  TARGET_QUICK=(--config.model=resnet_tiny --config.batch_size=64
                --config.dtype=float32 --config.num_train_steps=12
                --config.eval_every_steps=6 --config.target_accuracy=0.2)
  SIZES=("32 64" "64 32")
  PEER_STEPS=2
fi

# check NAME MIN MAX COMMAND...: runs COMMAND for at most MAX seconds, or
# what is left before the deadline; skips it when less than MIN is left.
# Its stdout (JSON lines) goes to stdout, its stderr to OUT_DIR/NAME.log.
check() {
  local name=$1 min=$2 limit=$3
  shift 3
  if ((DEADLINE > 0)); then
    local left=$((DEADLINE - SECONDS))
    if ((left < min)); then
      echo "{\"check\": \"$name\", \"skipped\": \"$left s left before the deadline\"}"
      return 1
    fi
    ((left < limit)) && limit=$left
  fi
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>"$OUT_DIR/$name.log"
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "{\"check\": \"$name\", \"failed\": $rc, \"seconds\": $((SECONDS - start)), \"log\": \"$OUT_DIR/$name.log\"}"
    tail -n 8 "$OUT_DIR/$name.log" | cut -c1-300
  fi
  return $rc
}

# results.json of a finished run as one line, with the check's name.
results_line() {
  "$PYTHON" -c 'import json, sys
r = json.load(open(sys.argv[2] + "/results.json"))
r.pop("config", None)
print(json.dumps({"check": sys.argv[1], **r}))' "$1" "$2"
}

# train_check NAME MIN MAX CONFIG_FILE [OVERRIDES...]: a fresh run of
# train.py.
train_check() {
  local name=$1 min=$2 limit=$3 config=$4
  shift 4
  local workdir=$OUT_DIR/$name
  rm -rf "$workdir"
  # --config must come before its overrides.
  check "$name" "$min" "$limit" "$PYTHON" train.py --config="$config" --workdir="$workdir" \
    --config.data_dir="$DATA_DIR" --config.input_pipeline=device \
    --config.download=false "$@" && results_line "$name" "$workdir"
}

# bench NAME MIN MAX SIZE BATCH [OVERRIDES...]
bench() {
  local name=$1 min=$2 limit=$3 size=$4 batch=$5
  shift 5
  check "$name" "$min" "$limit" "$PYTHON" -m mnist_resnet.benchmark \
    --config=configs/benchmark.py:gpu --config.data_dir="$DATA_DIR" \
    --config.input_pipelines=device --config.mode=all \
    --config.image_size="$size" --config.batch_size="$batch" \
    "${BENCH_QUICK[@]}" "$@"
}

"$PYTHON" -c 'import jax, json
print(json.dumps({"check": "devices", "jax": jax.__version__,
                  "backend": jax.default_backend(),
                  "devices": [d.device_kind for d in jax.devices()]}))'

train_check smoke 30 120 configs/smoke.py "${QUICK[@]}"

check time_to_target 90 300 "$PYTHON" -m mnist_resnet.benchmark \
  --config=configs/benchmark.py:large_batch --config.mode=target \
  --config.seeds=0,1 --config.data_dir="$DATA_DIR" --config.download=false \
  "${TARGET_QUICK[@]}"

for i in 1 2; do
  train_check "deterministic_$i" 30 120 configs/smoke.py \
    --config.deterministic=true "${QUICK[@]}"
done
"$PYTHON" -c 'import json, sys
hashes = []
for run in sys.argv[1:]:
  try:
    hashes.append(json.load(open(run + "/results.json")).get("params_sha256"))
  except OSError:
    hashes.append(None)
print(json.dumps({"check": "deterministic_repeat", "params_sha256": hashes,
                  "same": None not in hashes and len(set(hashes)) == 1}))' \
  "$OUT_DIR/deterministic_1" "$OUT_DIR/deterministic_2"

train_check scratch 60 180 configs/scratch.py "${QUICK[@]}"

# The 224x224 benchmark compiles the longest: it gets the most time.
limits=(120 200)
i=0
for sb in "${SIZES[@]}"; do
  read -r size batch <<<"$sb"
  bench "bench_${size}px_b${batch}" 60 "${limits[i]}" "$size" "$batch"
  i=$((i + 1))
done

if [[ -n $PEER ]] && "$PYTHON" -c 'import torch' 2>/dev/null; then
  for sb in "${SIZES[@]}"; do
    read -r size batch <<<"$sb"
    check "peer_torch_${size}px_b${batch}" 20 60 "$PYTHON" "$PEER" --bf16 \
      --channels_last --batch "$batch" --image_size "$size" --steps "$PEER_STEPS"
  done
elif [[ -n $PEER ]]; then
  echo '{"check": "peer_torch", "skipped": "torch does not import here"}'
fi

read -r size batch <<<"${SIZES[0]}"
bench "bench_${size}px_b${batch}_conv_as_dot_never" 40 90 "$size" "$batch" \
  --config.mode=step --config.conv_as_dot=never
bench "bench_${size}px_b${batch}_deterministic" 40 90 "$size" "$batch" \
  --config.mode=step --config.deterministic=true
train_check scratch_10_epochs 90 240 configs/scratch.py \
  --config.num_epochs=10 "${QUICK[@]}"

tar -czf "$OUT_DIR/logs.tgz" -C "$OUT_DIR" $(cd "$OUT_DIR" && ls -- *.log) \
  2>/dev/null
