"""Runs a script or module in a Python where TensorFlow cannot be imported.

    python tests/no_tensorflow.py train.py --config=...
    python tests/no_tensorflow.py -m mnist_resnet.benchmark --config=...

As on an accelerator image without TensorFlow: `import tensorflow` (and of
any of its submodules) raises ImportError. Libraries that probe for it
optionally go on without it; code that needs it fails loudly.
"""

import os
import runpy
import sys

BLOCKED = ("tensorflow", "tensorflow_datasets")


class NoTensorFlow:
  """A meta-path finder that refuses the blocked packages."""

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is blocked: this process runs without "
                        "TensorFlow")
    return None


def main() -> None:
  sys.meta_path.insert(0, NoTensorFlow())
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
