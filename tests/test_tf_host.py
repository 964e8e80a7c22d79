"""Tests for mnist_resnet.core.tf_host: TensorFlow never gets the GPUs.

On a machine without GPUs TensorFlow sees none whatever tf_host does, so
these tests watch the call that hides them instead.
"""

import inspect

import pytest

from mnist_resnet.core import tf_host


@pytest.fixture
def hide_calls(monkeypatch):
  """Records tf.config.set_visible_devices calls, with a fresh tf_host."""
  tf = tf_host.import_tensorflow()
  real = tf.config.set_visible_devices
  calls = []

  def record(*args, **kwargs):
    bound = inspect.signature(real).bind(*args, **kwargs)
    calls.append((bound.arguments["devices"],
                  bound.arguments.get("device_type")))

  monkeypatch.setattr(tf_host, "_gpus_hidden", False)
  monkeypatch.setattr(tf.config, "set_visible_devices", record)
  return calls


def test_import_tensorflow_hides_gpus_once(hide_calls):
  tf = tf_host.import_tensorflow()
  assert hide_calls == [([], "GPU")]
  assert tf_host.import_tensorflow() is tf
  assert hide_calls == [([], "GPU")]


def test_import_keras_hides_gpus(hide_calls):
  keras = tf_host.import_keras()
  assert hasattr(keras, "Model")
  assert hide_calls == [([], "GPU")]


def test_too_late_to_hide_is_a_warning(monkeypatch, caplog):
  tf = tf_host.import_tensorflow()

  def refuse(*args, **kwargs):
    del args, kwargs
    raise RuntimeError("Visible devices cannot be modified after being "
                       "initialized")

  monkeypatch.setattr(tf_host, "_gpus_hidden", False)
  monkeypatch.setattr(tf.config, "set_visible_devices", refuse)
  with caplog.at_level("WARNING"):
    assert tf_host.import_tensorflow() is tf
  assert any("before the GPUs could be hidden" in r.getMessage()
             for r in caplog.records)
  assert tf_host._gpus_hidden  # Warned once, not at every import.
