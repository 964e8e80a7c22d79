"""FLOP figures: the dense peak of known chips, for model FLOP utilisation."""

from __future__ import annotations

# Dense peak TFLOP/s of one chip, (bfloat16, float32), for `mfu`. float32 on
# NVIDIA is the TF32 tensor-core rate: XLA's default precision for float32
# convolutions and matmuls uses TF32 on Ampere and later. On TPU float32
# matmuls run as single bfloat16 passes by default, so both columns are the
# bfloat16 rate. Matched in order against the lower-cased device kind, so
# specific names come before the names they contain.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("h100 pcie", 756.0, 378.0),
    ("h100", 989.0, 495.0),
    ("h200", 989.0, 495.0),
    ("a100", 312.0, 156.0),
    ("tpu v4", 275.0, 275.0),
    ("tpu v5 lite", 197.0, 197.0),
    ("tpu v5e", 197.0, 197.0),
    ("tpu v5p", 459.0, 459.0),
    ("tpu v5", 459.0, 459.0),
    ("tpu v6 lite", 918.0, 918.0),
    ("tpu v6e", 918.0, 918.0),
    ("tpu7x", 2307.0, 2307.0),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The chip's dense peak for `dtype`, or None when it is not in the table
  (every CPU, and accelerators the table does not list)."""
  kind = device_kind.lower()
  for name, bf16, f32 in PEAK_TFLOPS:
    if name in kind:
      return bf16 if dtype == "bfloat16" else f32
  return None
