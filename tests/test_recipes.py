"""The launch recipes in tools/: the SLURM batch script run with stand-in
srun and scontrol, the GKE JobSet manifest checked field by field, the
Cloud TPU VM script run with a stand-in gcloud."""

from __future__ import annotations

import importlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO_ROOT

SBATCH = REPO_ROOT / "tools" / "slurm" / "train.sbatch"

# srun as a one-node cluster would run it: records its arguments, drops its
# options and starts the command as $SLURM_NTASKS local tasks, each with
# srun's variables (tools/launch.py --env=slurm) and one CPU device.
_SRUN = """#!/bin/bash
printf '%s\\n' "$*" >> "$RECORD/srun"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
exec "$LAUNCH_PYTHON" "$REPO_ROOT/tools/launch.py" --env=slurm \\
    --num_processes="$SLURM_NTASKS" --devices_per_process=1 -- "$@"
"""
_SCONTROL = """#!/bin/bash
printf '%s\\n' "$*" >> "$RECORD/scontrol"
"""
# train.py for the paths that need no training: `preempt_once` exits 75 on
# its first run (a save before the time limit) and 0 after; `wait` exits 75
# when SIGTERM reaches it. Each run records its arguments.
_TRAIN = """#!/bin/bash
printf '%s\\n' "$*" >> "$RECORD/train_$SLURM_PROCID"
case "$STANDIN_MODE" in
  preempt_once)
    if [ -e "$RECORD/saved_$SLURM_PROCID" ]; then exit 0; fi
    touch "$RECORD/saved_$SLURM_PROCID"; exit 75 ;;
  wait)
    trap 'exit 75' TERM
    echo $$ > "$RECORD/pid_$SLURM_PROCID"
    while :; do sleep 0.1; done ;;
esac
"""


def _write_tool(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def cluster(tmp_path):
  """A PATH with the stand-in srun and scontrol first, and the environment
  sbatch gives the batch script of a 2-task job."""
  bin_dir, record = tmp_path / "bin", tmp_path / "record"
  bin_dir.mkdir()
  record.mkdir()
  _write_tool(bin_dir / "srun", _SRUN)
  _write_tool(bin_dir / "scontrol", _SCONTROL)
  _write_tool(bin_dir / "train", _TRAIN)
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "JAX_"))}
  env.update({
      "PATH": f"{bin_dir}:{env['PATH']}", "RECORD": str(record),
      "REPO_ROOT": str(REPO_ROOT), "LAUNCH_PYTHON": sys.executable,
      "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_NNODES": "1",
      "SLURM_SUBMIT_DIR": str(REPO_ROOT), "PYTHON": str(bin_dir / "train"),
      "WORKDIR": str(tmp_path / "work"), "DATA_DIR": str(tmp_path / "data"),
  })
  return env, record


def _sbatch(env, *args, wait=True):
  proc = subprocess.Popen(["bash", str(SBATCH), *args], env=env,
                          cwd="/", stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def _lines(path: pathlib.Path) -> list[str]:
  return path.read_text().splitlines() if path.exists() else []


def test_sbatch_header_asks_for_one_task_per_gpu_and_requeue():
  head = [l for l in SBATCH.read_text().splitlines()
          if l.startswith("#SBATCH")]
  options = dict(l.split()[1].lstrip("-").partition("=")[::2] for l in head)
  assert "requeue" in options and options["signal"].startswith("TERM@")
  assert options["ntasks-per-node"] == options["gpus-per-node"]
  assert not any("gpus-per-task" in l or "gpu-bind" in l for l in head)
  text = SBATCH.read_text()
  assert "configs/gpu.py" in text and "--config.local_device_ids=" in text


def test_sbatch_requeues_a_run_stopped_at_its_time_limit(cluster):
  """SIGTERM before the time limit reaches the tasks only: train.py saves
  and exits 75, the script requeues the job; the requeued job runs the same
  command, which ends (0) without another requeue."""
  env, record = cluster
  env["STANDIN_MODE"] = "preempt_once"
  code, _, err = _sbatch(env, "--config.seed=3")
  assert code == 75, err
  assert _lines(record / "scontrol") == ["requeue 4242"]
  assert "requeueing job 4242" in err
  env["SLURM_RESTART_COUNT"] = "1"
  code, _, err = _sbatch(env, "--config.seed=3")
  assert code == 0, err
  assert _lines(record / "scontrol") == ["requeue 4242"]
  # Both tasks ran the same command each time: config, workdir, data,
  # distributed start-up and the arguments given to sbatch.
  expected = (f"train.py --config=configs/gpu.py --workdir={env['WORKDIR']} "
              f"--config.data_dir={env['DATA_DIR']} "
              "--config.distributed=true --config.seed=3")
  for i in (0, 1):
    assert _lines(record / f"train_{i}") == [expected, expected]
  srun = _lines(record / "srun")
  assert len(srun) == 2 and "gpus-per-task" not in srun[0]
  _assert_train_accepts(expected.split()[1:])


def _assert_train_accepts(flags: list[str]) -> None:
  """The config file exists and every --config.KEY is one of its keys: what
  train.py checks before anything runs (the training itself is
  tests/test_multihost.py's, under SLURM's variables)."""
  path = flags[0].removeprefix("--config=")
  assert (REPO_ROOT / path).is_file()
  config = importlib.import_module(
      path.removesuffix(".py").replace("/", ".")).get_config()
  for flag in flags[1:]:
    if flag.startswith("--config."):
      assert flag.removeprefix("--config.").split("=")[0] in config, flag


def test_sbatch_leaves_a_cancelled_job_to_slurm(cluster):
  """scancel or a preemption signals the batch script as well as the tasks:
  the script waits for their save and exits 75 without requeueing (SLURM
  requeues a preempted job itself when configured to)."""
  env, record = cluster
  env["STANDIN_MODE"] = "wait"
  proc = _sbatch(env, wait=False)
  deadline = time.monotonic() + 60
  while len(list(record.glob("pid_*"))) < 2:
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline
    time.sleep(0.05)
  tasks = [int((record / f"pid_{i}").read_text()) for i in (0, 1)]
  try:
    proc.send_signal(signal.SIGTERM)  # The batch shell, first.
    time.sleep(0.5)
    assert proc.poll() is None  # Still waiting for the tasks.
  finally:
    for pid in tasks:
      os.kill(pid, signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 75, err
  assert not (record / "scontrol").exists()
  assert "SIGTERM, waiting for the tasks" in err


# --- GKE: tools/gke/jobset.yaml -----------------------------------------

JOBSET = REPO_ROOT / "tools" / "gke" / "jobset.yaml"
# Fields of JobSet's v1alpha2 API (kubernetes-sigs/jobset,
# api/jobset/v1alpha2/jobset_types.go): a misspelt one would be dropped by
# the API server or refused by kubectl.
JOBSET_SPEC_FIELDS = {"replicatedJobs", "network", "successPolicy",
                      "failurePolicy", "startupPolicy", "suspend",
                      "coordinator", "managedBy", "ttlSecondsAfterFinished",
                      "volumeClaimPolicies"}
FAILURE_POLICY_FIELDS = {"maxRestarts", "restartStrategy", "rules"}
RULE_FIELDS = {"name", "action", "onJobFailureReasons",
               "onJobFailureMessagePatterns", "targetReplicatedJobs"}
ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts",
           "RestartJob", "RestartJobAndIgnoreMaxRestarts"}


@pytest.fixture(scope="module")
def jobset():
  return yaml.safe_load(JOBSET.read_text())


def _outcome(jobset, exit_code: int) -> str:
  """What Kubernetes and JobSet do when a pod's train container ends with
  `exit_code`: the Job's pod failure policy (first matching rule), its
  backoffLimit, then the JobSet's failure policy (first matching rule;
  none: RestartJobSet)."""
  if exit_code == 0:
    return "Succeeded"
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  reason = None
  for rule in job.get("podFailurePolicy", {}).get("rules", []):
    codes = rule.get("onExitCodes")
    if not codes or codes.get("containerName") not in (None, "train"):
      continue
    hit = (exit_code in codes["values"]) == (codes["operator"] == "In")
    if hit:
      reason = {"FailJob": "PodFailurePolicy"}.get(rule["action"],
                                                   rule["action"])
      break
  if reason is None:
    if job.get("backoffLimit", 6) > 0:
      return "pod retried alone"
    reason = "BackoffLimitExceeded"
  if reason not in ("PodFailurePolicy", "BackoffLimitExceeded"):
    return reason  # Ignore, Count, FailIndex: not a Job failure here.
  for rule in jobset["spec"]["failurePolicy"].get("rules", []):
    if reason in rule.get("onJobFailureReasons", [reason]):
      return rule["action"]
  return "RestartJobSet"


def test_jobset_restarts_on_75_and_fails_on_user_errors(jobset):
  """Exit 75 (saved after SIGTERM) and a kill restart every pod, within
  maxRestarts; a user error (2) or a crash (1) fails at once."""
  assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
  assert jobset["kind"] == "JobSet"
  assert jobset["spec"]["failurePolicy"]["maxRestarts"] > 0
  for code in (75, 137, 143):
    assert _outcome(jobset, code) == "RestartJobSet", code
  for code in (1, 2, 3):
    assert _outcome(jobset, code) == "FailJobSet", code
  assert _outcome(jobset, 0) == "Succeeded"


def test_jobset_fields_are_jobset_and_job_api_fields(jobset):
  spec = jobset["spec"]
  assert set(spec) <= JOBSET_SPEC_FIELDS
  assert set(spec["failurePolicy"]) <= FAILURE_POLICY_FIELDS
  for rule in spec["failurePolicy"]["rules"]:
    assert set(rule) <= RULE_FIELDS and rule["action"] in ACTIONS
  [replicated] = spec["replicatedJobs"]
  assert set(replicated) <= {"name", "groupName", "template", "replicas",
                             "dependsOn"}
  job = replicated["template"]["spec"]
  # The pod failure policy needs pods that are never restarted in place.
  assert job["template"]["spec"]["restartPolicy"] == "Never"
  assert job["backoffLimit"] == 0
  assert job["parallelism"] == job["completions"]
  for rule in job["podFailurePolicy"]["rules"]:
    assert rule["action"] in {"FailJob", "Ignore", "Count", "FailIndex"}
    assert rule["onExitCodes"]["operator"] in {"In", "NotIn"}


def test_jobset_runs_train_py_for_a_tpu_slice(jobset):
  """The command: train.py, configs/tpu.py, a gs:// workdir, distributed
  start-up; no JAX_* start-up variable that would override JAX's GKE TPU
  detection; a TPU per host and host names the pods resolve."""
  spec = jobset["spec"]
  job = spec["replicatedJobs"][0]["template"]["spec"]
  pod = job["template"]["spec"]
  [container] = pod["containers"]
  command = container["command"]
  assert command[:2] == ["python", "train.py"]
  assert "--config=configs/tpu.py" in command
  assert "--config.distributed=true" in command
  [workdir] = [a for a in command if a.startswith("--workdir=")]
  assert workdir.startswith("--workdir=gs://")
  _assert_train_accepts(command[2:])
  env = {e["name"]: e.get("value") for e in container.get("env", [])}
  assert env.get("JAX_PLATFORMS") == "tpu"
  assert not set(env) & {"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                         "JAX_PROCESS_ID", "TPU_WORKER_ID",
                         "TPU_WORKER_HOSTNAMES"}
  assert spec.get("network", {}).get("enableDNSHostnames", True)
  assert container["resources"]["limits"]["google.com/tpu"] > 0
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"]
  assert job["podFailurePolicy"]["rules"][0]["onExitCodes"][
      "containerName"] == container["name"]


# --- Cloud TPU VM: tools/tpu_vm.sh ---------------------------------------

TPU_VM = REPO_ROOT / "tools" / "tpu_vm.sh"
# gcloud for one slice: its state in $RECORD/state (no file: no slice);
# `create` fails while $RECORD/no_capacity counts down; each `ssh` takes
# the next line of $RECORD/outcomes: `preempt` (the VM is preempted under
# the run: ssh fails), or an exit code. Every call is recorded.
_GCLOUD = """#!/bin/bash
verb=$4
args="$*"
printf '%s\\n' "${args//$'\\n'/ }" >> "$RECORD/calls"
case "$verb" in
  describe)
    [ -e "$RECORD/state" ] || { echo "NOT_FOUND" >&2; exit 1; }
    cat "$RECORD/state" ;;
  create)
    n=$(cat "$RECORD/no_capacity" 2>/dev/null || echo 0)
    if [ "$n" -gt 0 ]; then echo $((n - 1)) > "$RECORD/no_capacity"; exit 1; fi
    echo READY > "$RECORD/state" ;;
  delete) rm "$RECORD/state" ;;
  ssh)
    for a in "$@"; do
      case "$a" in --command=*) printf '%s' "${a#--command=}" \\
          > "$RECORD/command" ;; esac
    done
    outcome=$(head -n 1 "$RECORD/outcomes")
    sed -i 1d "$RECORD/outcomes"
    if [ "$outcome" = preempt ]; then
      echo PREEMPTED > "$RECORD/state"; exit 255
    fi
    exit "$outcome" ;;
esac
"""


@pytest.fixture
def tpu_cloud(tmp_path):
  bin_dir, record = tmp_path / "bin", tmp_path / "record"
  bin_dir.mkdir()
  record.mkdir()
  _write_tool(bin_dir / "gcloud", _GCLOUD)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
             RECORD=str(record), TPU_NAME="mnist", ZONE="zone-a",
             ACCELERATOR_TYPE="v4-32", REPO="https://example.com/r.git",
             WORKDIR="gs://bucket/runs/tpu", RETRY_SECONDS="0")

  def run(outcomes, *args, **extra):
    (record / "outcomes").write_text("".join(f"{o}\n" for o in outcomes))
    proc = subprocess.run(["bash", str(TPU_VM), *args], env={**env, **extra},
                          capture_output=True, text=True, timeout=60)
    calls = [c.split()[3] for c in _lines(record / "calls")]
    return proc, calls

  return run, record


def test_tpu_vm_recreates_a_preempted_spot_slice_and_reruns(tpu_cloud):
  """No slice: created (after one refusal for capacity); the spot VM is
  preempted under the run: deleted, recreated, rerun; the run stops at a
  checkpoint (75) on a live slice: rerun; then done."""
  run, record = tpu_cloud
  (record / "no_capacity").write_text("1")
  proc, calls = run(["preempt", 75, 0], "--config.seed=1")
  assert proc.returncode == 0, proc.stderr
  assert calls == ["describe", "create", "describe", "create", "ssh",
                   "describe", "describe", "delete", "create", "ssh",
                   "describe", "ssh"]
  creates = [c for c in _lines(record / "calls") if " create " in c]
  assert all("--spot" in c and "--accelerator-type=v4-32" in c
             for c in creates)
  command = (record / "command").read_text()
  subprocess.run(["bash", "-n", "-c", command], check=True)
  train = command.splitlines()[-1]
  assert train == (".venv/bin/python train.py --config=configs/tpu.py "
                   "--workdir=gs://bucket/runs/tpu --config.seed=1")
  _assert_train_accepts(train.split()[2:])
  assert "git clone -q https://example.com/r.git mnist_resnet" in command


@pytest.mark.parametrize("outcomes, code, ssh_calls", [
    ([2], 2, 1),          # A user error on a live slice: not rerun.
    ([75, 75, 75], 1, 2),  # MAX_ATTEMPTS=2 reruns at most.
])
def test_tpu_vm_stops_on_errors_and_after_max_attempts(tpu_cloud, outcomes,
                                                       code, ssh_calls):
  run, record = tpu_cloud
  (record / "state").write_text("READY\n")
  proc, calls = run(outcomes, MAX_ATTEMPTS="2")
  assert proc.returncode == code, proc.stderr
  assert calls.count("ssh") == ssh_calls
  assert "create" not in calls and "delete" not in calls
