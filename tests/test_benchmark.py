"""`python -m mnist_resnet.benchmark` in every mode, as a user runs it.

The tiny model, small batches and 3 timed steps keep this fast on 2 CPU
cores; each subprocess compiles the real train step once or twice, which is
most of its time.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import Any
from typing import Callable

import numpy as np
import pytest

from configs import benchmark as benchmark_config
from mnist_resnet.commands import bench_modes
from mnist_resnet.commands import bench_record
from mnist_resnet.commands import bench_target
from mnist_resnet.commands import benchmark
from mnist_resnet.model import flops
from mnist_resnet.training import progress

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ("--config.model=resnet_tiny", "--config.bench_steps=3",
        "--config.bench_warmup_steps=1", "--config.download=false")
STEP_FIELDS = (
    "model", "image_size", "dtype", "batch_size", "per_device_batch_size",
    "device_count", "device_kind", "compile_seconds", "step_ms_median",
    "step_ms_p10", "step_ms_p90", "images_per_sec",
    "images_per_sec_per_device", "flops_per_step_model",
    "flops_per_example_train_model", "flops_per_step_xla", "tflops_per_sec",
    "mfu",
    "peak_memory_bytes", "host_to_device_bytes_per_example")


def _run(*args: str, devices: int = 1,
         without_tensorflow: bool = False) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  python = [sys.executable] + (
      [str(REPO_ROOT / "tests" / "accelerator_image.py")]
      if without_tensorflow else [])
  return subprocess.run(
      [*python, "-m", "mnist_resnet.benchmark",
       "--config=configs/benchmark.py", *args],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _json_lines(stdout: str) -> list[dict]:
  return [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]


def _tiny_train_flops(batch: int, size: int) -> float:
  """Multiply-adds of resnet_tiny's convolutions and dense layer, counted
  from the architecture (stem 7x7/2, 3x3/2 max-pool, one bottleneck per
  stage), times 2 (multiply + add) times 3 (forward, and the backward's
  gradients with respect to inputs and to weights)."""
  macs = 0
  side = -(-size // 2)  # 7x7 stride-2 conv, padding 3.
  macs += side * side * 7 * 7 * 3 * 16
  side = (side + 2 - 3) // 2 + 1  # Zero-pad 1, 3x3 stride-2 max-pool.
  cin = 16
  for stage, width in enumerate((8, 16, 32, 64)):
    stride = 1 if stage == 0 else 2
    out = -(-side // stride)
    macs += out * out * cin * 4 * width           # Projection shortcut.
    macs += out * out * cin * width               # 1x1 (strided).
    macs += out * out * 9 * width * width         # 3x3.
    macs += out * out * width * 4 * width         # 1x1 expansion.
    side, cin = out, 4 * width
  macs += cin * 10                                # Dense head.
  return 2.0 * 3.0 * macs * batch


def _check_measurement(r: dict, mode: str, batch: int, size: int,
                       devices: int = 1, warmup: int | None = 1,
                       sent_bytes: int = 28 * 28 + 4) -> None:
  for key in STEP_FIELDS:
    assert key in r, key
  assert r["mode"] == mode
  assert r["model"] == "resnet_tiny"
  assert (r["image_size"], r["batch_size"]) == (size, batch)
  assert r["dtype"] == "float32"
  assert (r["platform"], r["device_kind"]) == ("cpu", "cpu")
  assert (r["device_count"], r["process_count"]) == (devices, 1)
  assert batch % devices == 0
  assert r["per_device_batch_size"] == batch // devices
  assert r["timed_steps"] == 3  # --config.bench_steps
  if warmup is not None:
    assert r["warmup_steps"] == warmup
  for key in ("compile_seconds", "step_ms_median", "step_ms_p10",
              "step_ms_p90", "images_per_sec", "images_per_sec_per_device",
              "flops_per_step_model", "flops_per_step_xla",
              "tflops_per_sec"):
    assert r[key] > 0, (key, r[key])
  assert r["step_ms_p10"] <= r["step_ms_median"] <= r["step_ms_p90"]
  assert r["step_ms_p90"] <= r["step_ms_max"]
  assert r["step_ms_mean"] <= r["step_ms_max"]
  # Timed images over timed seconds: batch / mean step time.
  assert r["images_per_sec"] == pytest.approx(
      batch * 1e3 / r["step_ms_mean"], rel=1e-3)
  assert r["images_per_sec_per_device"] == pytest.approx(
      r["images_per_sec"] / devices, abs=0.011)
  # The model's FLOPs of one step (not XLA's) over the median step time;
  # printed to 4 decimals.
  tflops = r["flops_per_step_model"] / (r["step_ms_median"] / 1e3) / 1e12
  assert abs(r["tflops_per_sec"] - tflops) <= (
      5e-5 + tflops * 6e-4 / r["step_ms_median"]), (r["tflops_per_sec"],
                                                    tflops)
  # The model's count is the architecture's, exactly; XLA's, of the
  # compiled program (elementwise work in, padding taps out), is near it.
  analytic = _tiny_train_flops(batch, size)
  assert r["flops_per_step_model"] == analytic
  assert r["flops_per_example_train_model"] == analytic / batch
  assert analytic / 2 <= r["flops_per_step_xla"] <= analytic * 2, (
      r["flops_per_step_xla"], analytic)
  # uint8 28x28 image + int32 label, whatever the model's input size (none
  # with the device pipeline).
  assert r["host_to_device_bytes_per_example"] == sent_bytes
  assert r["mfu"] is None and r["peak_memory_bytes"] is None  # CPU.
  assert r["peak_tflops_per_device"] is None


def _check_input(r: dict, batch: int, wanted: int,
                 pipeline: str = "tfdata") -> None:
  """The input mode's record, for --config.input_images=wanted."""
  assert r["mode"] == "input"
  assert r["input_pipeline"] == pipeline
  assert r["batch_size"] == batch
  assert r["shuffle"] is True
  assert r["warmup_batches"] == bench_modes.INPUT_WARMUP_BATCHES
  # input_images rounded up to whole batches.
  assert r["batches"] == math.ceil(wanted / batch)
  assert r["images"] == r["batches"] * batch
  # uint8 28x28 image + int32 label; nothing after start-up on the device.
  assert r["host_to_device_bytes_per_example"] == (
      788 if pipeline == "tfdata" else 0)
  assert r["seconds"] > 0
  # images / seconds, with seconds printed to 4 decimals and images/s to 1.
  low = r["images"] / (r["seconds"] + 5e-5) - 0.05
  high = r["images"] / max(r["seconds"] - 5e-5, 1e-9) + 0.05
  assert low <= r["images_per_sec"] <= high, (r["images_per_sec"],
                                              r["images"], r["seconds"])


def test_all_modes_tiny_model(mnist_dir, tmp_path):
  result = _run(*FAST, "--config.mode=all", f"--config.data_dir={mnist_dir}",
                "--config.batch_size=32", "--config.input_images=2000",
                f"--config.profile_dir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = _json_lines(result.stdout)
  # Both input pipelines (the benchmark config's default); one step.
  assert [(r["mode"], r.get("input_pipeline")) for r in lines] == [
      ("input", "tfdata"), ("step", None), ("train", "tfdata"),
      ("all", "tfdata"), ("input", "device"), ("train", "device"),
      ("all", "device")]
  step = lines[1]
  _check_measurement(step, "step", 32, 32, warmup=1)
  for pipeline, (inp, train, summary) in (
      ("tfdata", (lines[0], lines[2], lines[3])), ("device", lines[4:7])):
    _check_input(inp, 32, 2000, pipeline)
    # The profile covers steps 11-13, so the train mode warms up past them.
    _check_measurement(
        train, "train", 32, 32,
        warmup=progress.PROFILE_START_AFTER + bench_modes.PROFILE_STEPS,
        sent_bytes=788 if pipeline == "tfdata" else 0)
    assert train["compile_seconds"] == step["compile_seconds"]
    # The training config's cadences; no checkpoint among the timed steps.
    assert train["log_every_steps"] == 10
    assert train["checkpoint_every_steps"] == 500
    assert train["checkpoints_in_timed_steps"] == 0
    assert {k: summary[k] for k in ("model", "image_size", "dtype",
                                    "batch_size", "input_pipeline")} == {
        "model": "resnet_tiny", "image_size": 32, "dtype": "float32",
        "batch_size": 32, "input_pipeline": pipeline}
    assert summary["step_images_per_sec"] == step["images_per_sec"]
    assert summary["train_images_per_sec"] == train["images_per_sec"]
    # train images/s / step images/s, printed to 4 decimals.
    assert summary["loop_efficiency"] == pytest.approx(
        train["images_per_sec"] / step["images_per_sec"], abs=5.1e-5)
  # Two pipelines: a table follows the JSON lines.
  assert len(result.stdout.strip().splitlines()) == len(lines) + 2 + len(
      lines)
  # Every profile was written: the step mode's and train.py's own, for each
  # pipeline.
  traces = sorted(p.relative_to(tmp_path).parts[0]
                  for p in tmp_path.rglob("*.xplane.pb"))
  assert traces == ["step_resnet_tiny_32px_b32_float32",
                    "train_resnet_tiny_32px_b32_float32",
                    "train_resnet_tiny_32px_b32_float32_device"], traces
  assert list(tmp_path.glob("step_*/**/perfetto_trace.json.gz"))
  assert all(r["versions"]["jax"] and r["versions"]["device_kind"] == "cpu"
             for r in lines)


def test_device_pipeline_benchmarks_without_tensorflow(mnist_dir):
  """Every mode with input_pipelines=device where TensorFlow cannot be
  imported, as on an accelerator image without it."""
  result = _run(*FAST, "--config.mode=all", f"--config.data_dir={mnist_dir}",
                "--config.batch_size=32", "--config.input_images=640",
                "--config.input_pipelines=device", without_tensorflow=True)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = _json_lines(result.stdout)
  assert [(r["mode"], r.get("input_pipeline")) for r in lines] == [
      ("input", "device"), ("step", None), ("train", "device"),
      ("all", "device")]
  _check_input(lines[0], 32, 640, "device")
  _check_measurement(lines[2], "train", 32, 32, sent_bytes=0)


def test_sweep_prints_every_combination_and_a_table():
  result = _run(*FAST, "--config.mode=step", "--config.batch_sizes=8,16",
                "--config.image_sizes=28", devices=2)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = _json_lines(result.stdout)
  assert [(r["batch_size"], r["image_size"]) for r in lines] == [
      (8, 28), (16, 28)]
  for r in lines:
    _check_measurement(r, "step", r["batch_size"], 28, devices=2)
  assert [r["per_device_batch_size"] for r in lines] == [4, 8]
  # The table comes after every JSON line: one row per line, same figures.
  out = result.stdout.splitlines()
  assert all(l.startswith("{") for l in out[:len(lines)])
  table = out[len(lines):]
  assert table[0].split()[:5] == ["mode", "input", "model", "size", "batch"]
  assert set(table[1]) == {"-"}
  assert [row.split() for row in table[2:]] == [[
      "step", "-", "resnet_tiny", "28", str(r["batch_size"]),
      str(r["per_device_batch_size"]), "float32",
      f"{r['step_ms_median']:.1f}", f"{r['step_ms_p10']:.1f}",
      f"{r['step_ms_p90']:.1f}", f"{r['images_per_sec']:.1f}",
      f"{r['tflops_per_sec']:.3f}", "-", f"{r['compile_seconds']:.1f}", "-"]
      for r in lines]


def test_input_benchmark_prints_json(mnist_dir):
  result = _run("--config.mode=input", f"--config.data_dir={mnist_dir}",
                "--config.download=false", "--config.input_images=20000",
                "--config.batch_size=128", "--config.input_pipelines=tfdata")
  assert result.returncode == 0, result.stderr
  out = result.stdout.strip().splitlines()
  assert len(out) == 1, result.stdout  # One measurement: no table.
  record = json.loads(out[0])
  _check_input(record, 128, 20000)
  assert (record["batches"], record["images"]) == (157, 157 * 128)


def test_missing_data_is_one_line_exit_2(tmp_path):
  result = _run("--config.mode=input", f"--config.data_dir={tmp_path}",
                "--config.download=false")
  assert result.returncode == 2
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: missing train-images-idx3-ubyte")
  assert "Traceback" not in result.stderr


def test_target_mode_reports_each_seed_and_their_spread(monkeypatch):
  """Each seed trains once, stopping at its target, in its own workdir; the
  summary's median and range are over the seeds (those that reached the
  target, for the time to it). The real runs behind these results:
  tests/test_goodput.py."""
  trained = []

  def train_and_evaluate(config, workdir):
    trained.append((config.seed, config.stop_at_target, workdir))
    reached = {0: (60, 12.5), 1: (None, None), 2: (80, 20.0)}[config.seed]
    return {"target_accuracy": config.target_accuracy,
            "target_split": "validation", "target_reached_step": reached[0],
            "seconds_to_target": reached[1], "step": reached[0] or 100,
            "test_accuracy": 0.9, "images_per_sec": 100.0 + config.seed,
            "time": {"compilation": 3.0, "evaluation_compilation": 1.0}}

  monkeypatch.setattr(bench_target.train, "train_and_evaluate",
                      train_and_evaluate)
  config = benchmark_config.get_config("smoke")
  config.mode, config.seeds = "target", "0,1,2"
  config.target_accuracy, config.validation_examples = 0.5, 1000
  emitted = []
  lines = benchmark.measure_all(config, emitted.append)
  assert lines == emitted
  *seeds, spread = lines
  assert [r["mode"] for r in seeds] == ["target"] * 3
  assert [t[:2] for t in trained] == [(0, True), (1, True), (2, True)]
  assert len({t[2] for t in trained}) == 3  # A fresh workdir each.
  assert [r["seed"] for r in seeds] == [0, 1, 2]
  assert seeds[0]["compile_seconds"] == 4.0
  assert spread["mode"] == "target_summary" and spread["seeds"] == [0, 1, 2]
  assert spread["reached"] == 2
  assert (spread["seconds_to_target_median"], spread["seconds_to_target_min"],
          spread["seconds_to_target_max"]) == (16.25, 12.5, 20.0)
  assert spread["images_per_sec_median"] == 101.0
  assert all(r["versions"]["jax"] for r in lines)


@pytest.mark.parametrize("args, message", [
    (("--config.mode=nonsense",), "config.mode='nonsense'"),
    (("--config.batch_sizes=64,x",), "config.batch_sizes='64,x'"),
    (("--config.image_sizes=0",), "config.image_sizes='0'"),
    (("--config.bench_steps=0",), "config.bench_steps=0"),
    (("--config.input_pipelines=tfdata,disk",),
     "config.input_pipelines='tfdata,disk': 'disk' is not one of"),
    (("--config.mode=target",),
     "config.target_accuracy=0.0: the target mode needs a target"),
    (("--config.mode=target", "--config.target_accuracy=0.9",
      "--config.seeds=0,x"), "config.seeds='0,x': must be comma-separated"),
])
def test_bad_benchmark_keys_are_config_errors(tmp_path, args, message):
  result = _run(*args, f"--config.data_dir={tmp_path}")
  assert result.returncode == 2
  assert message in result.stderr
  assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------
# In-process pieces.


def test_step_that_diverges_is_one_line_exit_2():
  result = _run(*FAST, "--config.mode=step", "--config.batch_size=8",
                "--config.image_size=28", "--config.learning_rate=1e36",
                "--config.warmup_steps=0")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: the benchmarked train step diverged: train loss nan after 4 "
      "steps; lower config.learning_rate (now 1e+36)")
  assert [l for l in result.stderr.splitlines() if l.startswith("error:")
          ] == [result.stderr.strip().splitlines()[-1]]


def test_batch_that_does_not_fit_is_one_line_exit_2():
  """4,000,000 images a step (hundreds of GiB): the compiler's analysis
  refuses it before anything runs; one line with the batch per device, the
  bytes asked and a batch to try, not XLA's errors."""
  result = _run(*FAST, "--config.mode=step", "--config.batch_size=4000000",
                devices=2)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stdout == ""
  assert "Traceback" not in result.stderr
  assert "Error dispatching" not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr
  assert errors[0].startswith(
      "error: config.batch_size=4000000 (2000000 per device) does not fit in "
      "memory: the train step needs "), errors[0]
  smaller = int(errors[0].rpartition("; try config.batch_size=")[2])
  assert 0 < smaller < 4000000 and smaller % 2 == 0, errors[0]


def test_peak_table():
  assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989
  assert flops.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756
  assert flops.peak_tflops("NVIDIA H200", "float32") == 495
  assert flops.peak_tflops("NVIDIA A100-SXM4-40GB", "bfloat16") == 312
  assert flops.peak_tflops("TPU v4", "bfloat16") == 275
  assert flops.peak_tflops("TPU v5 lite", "bfloat16") == 197
  assert flops.peak_tflops("TPU v5p", "float32") == 459
  assert flops.peak_tflops("TPU v6 lite", "bfloat16") == 918
  assert flops.peak_tflops("cpu", "float32") is None


def test_parse_sizes():
  assert benchmark.parse_sizes("", 128, "batch_sizes") == [128]
  assert benchmark.parse_sizes("64,128,64", 1, "batch_sizes") == [64, 128]


def test_synthetic_batch_is_what_the_pipeline_yields(mnist_dir):
  from configs import benchmark as benchmark_config
  from mnist_resnet.data import input_pipeline
  from mnist_resnet.data import mnist
  config = benchmark_config.get_config()
  config.batch_size = 16
  fake = bench_record.synthetic_batch(config)
  split = mnist.load_mnist(mnist_dir)["train"]
  real = next(input_pipeline.train_dataset(split, global_batch_size=16,
                                 seed=0).as_numpy_iterator())
  assert {k: (v.shape, v.dtype) for k, v in fake.items()} == {
      k: (v.shape, v.dtype) for k, v in real.items()}


# Seconds before a ReadyClock test gives up on a wait instead of hanging.
_CLOCK_TIMEOUT_S = 20


class _GatedLoss:
  """A step's loss that becomes ready only once `gate` is set; notes the
  order in which the clock waits on the steps."""

  def __init__(self, step: int, gate: threading.Event, waited: list[int],
               error: BaseException | None = None):
    self.step, self.gate, self.waited, self.error = step, gate, waited, error

  def block_until_ready(self):
    if not self.gate.wait(timeout=_CLOCK_TIMEOUT_S):
      raise TimeoutError(f"step {self.step}'s gate was never opened")
    self.waited.append(self.step)
    if self.error is not None:
      raise self.error
    return self


def _within(seconds: float, fn: Callable[[], Any], what: str) -> Any:
  """fn() in a daemon thread; fails the test instead of hanging if it has
  not returned after `seconds`. Exceptions from fn are re-raised here."""
  out: dict[str, Any] = {}

  def target():
    try:
      out["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      out["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"{what} still blocked after {seconds} s"
  if "error" in out:
    raise out["error"]
  return out.get("value")


def test_ready_clock_times_steps_without_blocking_the_caller():
  """`clock(step, metrics)` returns while the step is still running; each
  step's time is taken when its loss is ready, in step order."""
  gate, waited = threading.Event(), []
  clock = bench_record.ReadyClock()

  def dispatch_three_steps():
    for step in range(1, 4):
      clock(step, {"train_loss": _GatedLoss(step, gate, waited)})

  try:
    # A clock that waited in the caller would sit on the closed gate here.
    _within(5, dispatch_three_steps, "clock(step, metrics) with step "
            "outputs not ready yet")
    # Time for a clock that does not wait to note the steps too early.
    time.sleep(0.05)
    opened = time.perf_counter()
  finally:
    gate.set()
  ready = _within(_CLOCK_TIMEOUT_S, clock.close, "clock.close()")
  assert waited == [1, 2, 3]
  assert sorted(ready) == [1, 2, 3]
  # Taken when each loss became ready, not when the step was handed over.
  assert opened <= ready[1] <= ready[2] <= ready[3] <= time.perf_counter()


def test_ready_clock_waits_on_jax_arrays():
  import jax
  import jax.numpy as jnp
  clock = bench_record.ReadyClock()
  f = jax.jit(lambda x: (x @ x).sum())
  x = jnp.ones((256, 256))
  for step in range(1, 4):
    clock(step, {"train_loss": f(x)})
  ready = _within(_CLOCK_TIMEOUT_S, clock.close, "clock.close()")
  assert sorted(ready) == [1, 2, 3]
  assert ready[1] <= ready[2] <= ready[3]


def test_ready_clock_close_reraises_an_error_of_its_thread():
  """A step that fails on the device fails the benchmark at close()."""
  gate, waited = threading.Event(), []
  gate.set()
  failure = RuntimeError("device lost during step 2")
  clock = bench_record.ReadyClock()
  for step in range(1, 4):
    clock(step, {"train_loss": _GatedLoss(
        step, gate, waited, error=failure if step == 2 else None)})
  with pytest.raises(RuntimeError, match="device lost during step 2") as info:
    _within(_CLOCK_TIMEOUT_S, clock.close, "clock.close()")
  assert failure in (info.value, info.value.__cause__)


def test_format_table_aligns_rows():
  rows = [{"mode": "step", "model": "m", "image_size": 32, "batch_size": 8,
           "images_per_sec": 12.345, "mfu": None},
          {"mode": "all", "model": "m", "image_size": 32, "batch_size": 8,
           "loop_efficiency": 0.98}]
  lines = benchmark.format_table(rows).splitlines()
  assert len(lines) == 4
  assert "12.3" in lines[2] and "0.980" in lines[3]
  assert len({len(l) for l in lines[:2]}) == 1
  assert np.all([l.startswith(("mode", "-", "step", "all")) for l in lines])


def test_mfu_uses_the_model_count(monkeypatch):
  """tflops_per_sec and mfu come from the model's FLOPs, not XLA's."""
  monkeypatch.setattr(flops, "peak_tflops", lambda kind, dtype: 2.0)
  config = benchmark_config.get_config()
  config.batch_size = 8
  info = {"compile_seconds": 1.0, "flops_per_step_model": 3e10,
          "flops_per_example_train_model": 3e10 / 8,
          "flops_per_step_xla": 1e10}
  r = bench_record.result("step", config, [0.01, 0.02, 0.03], 1, info, 788)
  assert (r["flops_per_step_model"], r["flops_per_step_xla"]) == (3e10, 1e10)
  assert r["tflops_per_sec"] == pytest.approx(3e10 / 0.02 / 1e12)  # 1.5
  assert r["peak_tflops_per_device"] == 2.0
  assert r["mfu"] == pytest.approx(1.5 / (2.0 * r["device_count"]))
