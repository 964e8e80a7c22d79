"""Two processes x two CPU devices over gloo against one process x four."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from test_train import EQUIVALENCE_ARGS as ARGS
from test_train import SMOKE
from test_train import assert_same_training
from test_train import logged_steps
from test_train import metrics
from test_train import results
from test_train import run_train

from conftest import CACHE_FLAG
from conftest import REPO_ROOT


def launch(workdir, *args, num_processes=2, devices=2, timeout=400,
           wait=True, env="jax"):
  """Runs train.py as `num_processes` processes through the launcher, which
  gives them JAX's start-up variables, or only those of srun or mpirun
  (`env`).

  The timeout is generous: on a loaded 2-core machine the fixture's 20-step
  two-process run has taken over 170 s.
  """
  cmd = [sys.executable, str(REPO_ROOT / "tools" / "launch.py"),
         f"--num_processes={num_processes}",
         f"--devices_per_process={devices}", f"--timeout={timeout}",
         f"--logs={workdir}/logs", f"--env={env}", "--",
         sys.executable, str(REPO_ROOT / "train.py"), f"--config={SMOKE}",
         f"--workdir={workdir}", "--config.distributed=true", CACHE_FLAG,
         *args]
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  proc.wait(timeout=timeout + 30)
  return proc


# parallel.initialize_distributed's line when JAX's cluster detection finds
# every start-up value.
DETECTED = ("jax.distributed.initialize: coordinator address from JAX's "
            "cluster detection, process count from JAX's cluster detection, "
            "process id from JAX's cluster detection")


def process_log(workdir, i) -> str:
  return (pathlib.Path(workdir) / "logs" / f"process_{i}.log").read_text()


@pytest.fixture(scope="module")
def runs(mnist_dir, tmp_path_factory):
  """The same 20 steps as 2 processes x 2 devices and 1 process x 4. The two
  processes see only what srun sets for a 2-task step on one node (no JAX_*
  variable, no start-up key): JAX's SLURM detection starts them. The other
  two-process runs here get JAX's variables from the launcher."""
  base = tmp_path_factory.mktemp("multihost")
  data = f"--config.data_dir={mnist_dir}"
  proc = launch(base / "two", data, *ARGS, env="slurm")
  assert proc.returncode == 0, process_log(base / "two", 0)[-3000:]
  run_train(base / "one", data, *ARGS, devices=4)
  return base


@pytest.mark.slow
def test_device_pipeline_matches_tf_data_across_processes(runs, mnist_dir):
  """Every process holds the dataset and the global batch is gathered
  inside jit: the same run, bit for bit, as tf.data's per-process shards."""
  proc = launch(runs / "two_device", f"--config.data_dir={mnist_dir}", *ARGS,
                "--config.input_pipeline=device")
  assert proc.returncode == 0, process_log(runs / "two_device", 0)[-3000:]
  device, tfdata = results(runs / "two_device"), results(runs / "two")
  assert (device["processes"], device["devices"]) == (2, 4)
  for key in ("params_sha256", "test_accuracy", "test_loss",
              "per_class_accuracy", "final_train_loss"):
    assert device[key] == tfdata[key], key


@pytest.mark.slow
def test_two_processes_match_one(runs, mnist_dir):
  two, one = results(runs / "two"), results(runs / "one")
  assert (two["processes"], two["devices"]) == (2, 4)
  assert (one["processes"], one["devices"]) == (1, 4)
  assert two["eval_examples"] == 10000
  assert_same_training(runs / "one", runs / "two", mnist_dir)
  # Only process 0 writes metrics and results (each step logged once); every
  # log line names its process.
  logged = metrics(runs / "two")
  assert [m["step"] for m in logged if "train_loss" in m] == list(
      range(1, 21))
  assert [m["step"] for m in logged if "test_accuracy" in m] == [20]
  assert "[process 0/2]" in process_log(runs / "two", 0)
  assert "[process 1/2]" in process_log(runs / "two", 1)
  for i in (0, 1):  # Started by SLURM's variables alone.
    assert DETECTED in process_log(runs / "two", i)
  assert len(list((runs / "two").glob("events.out.tfevents*"))) == 1


def _resume_from_10(src, dst):
  """`src` as it was when its step-10 checkpoint was the latest: checkpoint
  20, results.json and the metrics of steps 11-20 removed."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("logs"))
  shutil.rmtree(dst / "checkpoints" / "20")
  (dst / "results.json").unlink()
  kept = [json.dumps(m) + "\n" for m in metrics(dst) if m["step"] <= 10]
  assert len(kept) == 10
  (dst / "metrics.jsonl").write_text("".join(kept))


@pytest.mark.slow
def test_checkpoints_restore_across_process_counts(runs, mnist_dir):
  """A run resumed at step 10 on the other process count trains steps 11-20
  as the straight run on that count does: same per-step losses, accuracy
  and parameters at step 20 (a restore that lost the optimizer state or the
  data position would change them)."""
  data = f"--config.data_dir={mnist_dir}"
  # Written by 2 processes, restored by 1.
  _resume_from_10(runs / "two", runs / "two_then_one")
  run_train(runs / "two_then_one", data, *ARGS, devices=4)
  r = results(runs / "two_then_one")
  assert r["resumed_from"] == 10 and r["steps_run"] == 10
  assert (r["processes"], r["devices"]) == (1, 4)
  assert_same_training(runs / "one", runs / "two_then_one", mnist_dir)
  # Written by 1 process, restored by 2.
  _resume_from_10(runs / "one", runs / "one_then_two")
  proc = launch(runs / "one_then_two", data, *ARGS)
  assert proc.returncode == 0, process_log(runs / "one_then_two", 0)[-3000:]
  r = results(runs / "one_then_two")
  assert r["resumed_from"] == 10 and r["steps_run"] == 10
  assert (r["processes"], r["devices"]) == (2, 4)
  assert_same_training(runs / "two", runs / "one_then_two", mnist_dir)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(mnist_dir,
                                                           tmp_path):
  # A checkpoint period the run never reaches: the only checkpoint can be
  # the preemption's, at the step every process agreed on.
  args = (f"--config.data_dir={mnist_dir}", "--config.num_train_steps=400",
          "--config.batch_size=64", "--config.checkpoint_every_steps=100000",
          "--config.eval_every_steps=0", "--config.log_every_steps=10")
  proc = launch(tmp_path, *args, wait=False)
  ckpts = tmp_path / "checkpoints"
  # Both processes are in the loop once process 0 has logged a step.
  deadline = time.time() + 150
  while not logged_steps(tmp_path):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  seen = max(logged_steps(tmp_path))
  # SIGTERM one worker only, as a scheduler preempting one host would.
  out = subprocess.run(["pgrep", "-f", f"workdir={tmp_path}"],
                       capture_output=True, text=True).stdout.split()
  workers = []
  for pid in map(int, out):
    environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes()
    if b"JAX_PROCESS_ID=1\0" in environ and b"train.py" in pathlib.Path(
        f"/proc/{pid}/cmdline").read_bytes():
      workers.append(pid)
  assert len(workers) == 1, out
  os.kill(workers[0], signal.SIGTERM)
  proc.wait(timeout=90)
  assert proc.returncode == 75, proc.stdout.read()[-3000:]
  # Each process says it saved (it raised Preempted), at the same step.
  steps = []
  for i in (0, 1):
    said = re.findall(r"checkpoint saved at step (\d+)",
                      process_log(tmp_path, i))
    assert len(said) == 1, process_log(tmp_path, i)[-3000:]
    steps.append(int(said[0]))
  assert steps[0] == steps[1]
  assert seen <= steps[0] < 400, (seen, steps)
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [
      steps[0]]
  assert not (tmp_path / "results.json").exists()
