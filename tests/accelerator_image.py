"""Runs a script or module as on an accelerator image that lacks TensorFlow.

    python tests/accelerator_image.py train.py --config=...
    python tests/accelerator_image.py -m mnist_resnet.benchmark --config=...

GPU and TPU images often hold JAX and little else: the one this project's
GPU figures come from has no TensorFlow, no Keras and no Google Cloud
client libraries. Here importing any of those (or their submodules) raises
ImportError, so a local run that needs one of them fails as it would there.
"""

import os
import runpy
import sys

BLOCKED = ("tensorflow", "tensorflow_datasets", "keras", "gcsfs",
           "google.cloud", "google.api_core", "google.auth")


class AcceleratorImage:
  """A meta-path finder that refuses the blocked packages."""

  def find_spec(self, name, path=None, target=None):
    del path, target
    if any(name == b or name.startswith(b + ".") for b in BLOCKED):
      raise ImportError(f"{name} is blocked: this process runs as on an "
                        "accelerator image without it")
    return None


def main() -> None:
  sys.meta_path.insert(0, AcceleratorImage())
  args = sys.argv[1:]
  # sys.path[0] as `python SCRIPT` or `python -m MODULE` would set it.
  if args[0] == "-m":
    sys.argv = args[1:]
    sys.path[0] = os.getcwd()
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
  else:
    sys.argv = args
    sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
    runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
  main()
