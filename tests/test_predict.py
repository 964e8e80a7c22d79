"""The predict tool: images and idx files -> the model's digit, one JSON line
each. Real MNIST test digits are drawn as real image files (larger, moved,
inverted, coloured, JPEG) and must get the digit the model gives the
original; the command line runs in one subprocess for all of them."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from mnist_resnet.commands import digits as digits_lib
from mnist_resnet.commands import predict
from mnist_resnet.data import idx
from mnist_resnet.data import mnist
from mnist_resnet.training import classification
from mnist_resnet.training import trained

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs the tool where `import tensorflow` fails: predicting must not need it
# (accelerator images have none).
ACCELERATOR_IMAGE = str(REPO_ROOT / "tests" / "accelerator_image.py")


def run_predict(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.run(
      [sys.executable, ACCELERATOR_IMAGE, "-m", "mnist_resnet.predict", *args],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def centre_of_mass(image: np.ndarray) -> np.ndarray:
  x = image.astype(np.float64)
  rows, cols = np.indices(x.shape)
  return np.array([(x * rows).sum(), (x * cols).sum()]) / x.sum()


def bounding_box(image: np.ndarray) -> tuple[int, int]:
  rows = np.flatnonzero(image.any(axis=1))
  cols = np.flatnonzero(image.any(axis=0))
  return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def mnist_file(mnist_dir: pathlib.Path, name: str) -> pathlib.Path:
  plain = mnist_dir / name
  return plain if plain.exists() else mnist_dir / (name + ".gz")


@pytest.fixture(scope="module")
def test_set(mnist_dir):
  """The first 300 test images and labels."""
  images = idx.read_idx(mnist_file(mnist_dir, mnist.TEST_IMAGES))[:300]
  labels = idx.read_idx(mnist_file(mnist_dir, mnist.TEST_LABELS))[:300]
  return images, labels


# --------------------------------------------------------------------------
# Drawing real digits as image files


def enlarged(image: np.ndarray, size: int, resample) -> Image.Image:
  return Image.fromarray(image).resize((size, size), resample)


def white_on_black(image: np.ndarray) -> Image.Image:
  """5x larger, smooth, off-centre on a wider black canvas."""
  canvas = Image.new("L", (300, 220), 0)
  canvas.paste(enlarged(image, 140, Image.BICUBIC), (150, 20))
  return canvas


def black_on_white(image: np.ndarray) -> Image.Image:
  """3x larger, blocky, low on a white canvas."""
  canvas = Image.new("L", (200, 160), 255)
  canvas.paste(enlarged(255 - image, 84, Image.NEAREST), (10, 60))
  return canvas


def blue_on_yellow(image: np.ndarray) -> Image.Image:
  """Blue ink on pale yellow paper, RGB."""
  ink = np.asarray(enlarged(image, 112, Image.LANCZOS), np.float64)
  ink = (ink / 255)[..., None]
  paper, pen = np.array([250., 235., 170.]), np.array([30., 40., 150.])
  rgb = np.broadcast_to(paper, (160, 180, 3)).copy()
  rgb[30:142, 40:152] = paper * (1 - ink) + pen * ink
  return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


def as_jpeg(image: np.ndarray) -> bytes:
  """Black on white, smooth, JPEG at quality 85."""
  canvas = Image.new("L", (180, 180), 255)
  canvas.paste(enlarged(255 - image, 140, Image.BILINEAR), (25, 15))
  out = io.BytesIO()
  canvas.save(out, "JPEG", quality=85)
  return out.getvalue()


def png_bytes(image: Image.Image) -> bytes:
  out = io.BytesIO()
  image.save(out, "PNG")
  return out.getvalue()


# --------------------------------------------------------------------------
# to_mnist: no model


@pytest.mark.parametrize("resample", [Image.NEAREST, Image.BICUBIC])
def test_an_enlarged_moved_digit_comes_back_as_it_was(test_set, resample):
  images, _ = test_set
  diffs = []
  for image in images[:40]:
    canvas = np.zeros((260, 200), np.uint8)
    canvas[100:240, 10:150] = np.asarray(enlarged(image, 140, resample))
    out = digits_lib.to_mnist(canvas)
    assert out.dtype == np.uint8 and out.shape == (28, 28)
    # MNIST's centres of mass lie within half a pixel of (14, 14) (and a
    # little more after rounding to uint8).
    np.testing.assert_array_less(np.abs(centre_of_mass(out) - 14), 0.51)
    np.testing.assert_array_less(
        np.abs(centre_of_mass(out) - centre_of_mass(image)), 1.0 + 1e-9)
    assert max(bounding_box(out)) in (19, 20, 21)
    diffs.append(np.abs(out.astype(float) - image).mean())
  # Pixel repetition is undone exactly but for the faintest edge pixels;
  # bicubic blurs edges.
  limit = 4.0 if resample == Image.NEAREST else 9.0
  assert np.mean(diffs) < limit, np.mean(diffs)


def test_a_dark_shape_on_light_ground_is_fitted_light_on_black():
  grey = np.full((300, 400), 0.9)
  grey[50:250, 100:150] = 0.2  # A bar 200 tall, 50 wide.
  out = digits_lib.to_mnist(grey)
  assert bounding_box(out) == (20, 5)  # Aspect kept, larger side 20.
  assert out.max() == 255 and out[0, 0] == 0
  np.testing.assert_array_less(np.abs(centre_of_mass(out) - 14), 0.51)


def test_a_lopsided_digit_is_moved_back_inside_the_field():
  grey = np.zeros((120, 120), np.uint8)
  grey[10:40, 10:40] = 255  # Most of the mass in the top left corner...
  for i in range(40, 110):
    grey[i, i - 1:i + 1] = 255  # ... and a thin tail to the bottom right.
  out = digits_lib.to_mnist(grey)
  # The centre of mass cannot reach the centre without the tail leaving the
  # field; the whole digit stays in it instead.
  assert bounding_box(out) == (20, 20)
  assert out[-1].any() and out[:, -1].any()
  assert (centre_of_mass(out) < 13).all()


def test_ground_shading_and_noise_are_not_ink():
  rng = np.random.default_rng(0)
  grey = (200 + np.linspace(-20, 20, 300)[None, :] +
          rng.normal(0, 4, (240, 300)))
  grey[60:180, 140:164] = 40  # The digit: a pencil stroke.
  grey[20, 20] = 0  # Specks of dust.
  grey[200:202, 250:252] = 0
  out = digits_lib.to_mnist(np.clip(grey, 0, 255).astype(np.uint8))
  assert bounding_box(out) == (20, 4)


@pytest.mark.parametrize("grey", [
    np.full((50, 60), 255, np.uint8),
    np.zeros((50, 60), np.uint8),
    np.clip(np.random.default_rng(0).normal(240, 2, (64, 64)), 0,
            255).astype(np.uint8),
], ids=["white", "black", "noisy-white"])
def test_a_blank_image_has_no_digit(grey):
  with pytest.raises(digits_lib.NoDigit):
    digits_lib.to_mnist(grey)


def test_sixteen_bit_and_float_scales_agree_with_eight_bit(test_set):
  image = np.asarray(enlarged(test_set[0][0], 84, Image.BICUBIC))
  expected = digits_lib.to_mnist(image)
  np.testing.assert_array_equal(
      digits_lib.to_mnist(image.astype(np.uint16) * 257), expected)
  np.testing.assert_array_equal(digits_lib.to_mnist(image / 255.0), expected)


# --------------------------------------------------------------------------
# Reading files: every colour mode, transparency, damage


def test_every_colour_mode_reads_as_the_same_grey(test_set, tmp_path):
  image = np.asarray(enlarged(test_set[0][0], 84, Image.BICUBIC))
  expected = digits_lib.to_mnist(image)
  ink = 255 - image
  rgba_black = np.zeros((*image.shape, 4), np.uint8)
  rgba_black[..., 3] = image  # Black strokes on a transparent canvas.
  rgba_white = rgba_black.copy()
  rgba_white[..., :3] = 255  # White strokes on a transparent canvas.
  variants = {
      "grey.png": Image.fromarray(image),
      "bilevel.png": Image.fromarray(image).convert("1"),
      "palette.png": Image.fromarray(ink).convert("P"),
      "rgb.png": Image.fromarray(ink).convert("RGB"),
      "grey16.png": Image.fromarray(image.astype(np.uint16) * 257),
      "rgba_black.png": Image.fromarray(rgba_black, "RGBA"),
      "rgba_white.png": Image.fromarray(rgba_white, "RGBA"),
      "la.png": Image.fromarray(rgba_black, "RGBA").convert("LA"),
  }
  for name, picture in variants.items():
    picture.save(tmp_path / name)
  # A palette of black only, each entry as opaque as its index (tRNS).
  palette_alpha = Image.fromarray(image).convert("P")
  palette_alpha.putpalette([0] * 768)
  palette_alpha.save(tmp_path / "palette_alpha.png",
                     transparency=bytes(range(256)))
  variants["palette_alpha.png"] = palette_alpha
  for name in variants:
    out = digits_lib.to_mnist(digits_lib.read_grey(str(tmp_path / name)))
    limit = 40 if name == "bilevel.png" else 1  # Thresholded to 1 bit.
    assert np.abs(out.astype(int) - expected).mean() < limit, name


def test_transparent_margins_take_the_colour_of_the_paper():
  grey = np.full((40, 40), 0.9)
  grey[10:30, 18:22] = 0.1
  alpha = np.zeros_like(grey)
  alpha[2:38, 2:38] = 1.0  # Opaque paper, transparent margins.
  flat = digits_lib.flatten_alpha(grey, alpha)
  assert flat[0, 0] == pytest.approx(0.9)
  assert bounding_box(digits_lib.to_mnist(flat)) == (20, 4)


@pytest.mark.parametrize("name, content, message", [
    ("cut.png", None, "truncated"),
    ("text.png", b"not an image", "not an image file"),
    ("blank.png", png_bytes(Image.new("RGB", (30, 30), "white")),
     "no digit"),
    ("empty.jpg", b"", "not an image file"),
])
def test_damaged_or_empty_images_are_data_errors(tmp_path, name, content,
                                                 message):
  if content is None:
    whole = png_bytes(white_on_black(np.eye(28, dtype=np.uint8) * 255))
    content = whole[:len(whole) // 2]
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(digits_lib.DataError, match=message) as e:
    digits_lib.read_digits(str(path))
  assert str(e.value).startswith(f"{path}: ")


def test_idx_files_are_told_from_images_by_content_and_name(tmp_path):
  images = np.zeros((2, 28, 28), np.uint8)
  idx.write_idx(tmp_path / "a.gz", images)
  idx.write_idx(tmp_path / "digits", images)
  idx.write_idx(tmp_path / "labels-idx1-ubyte", np.zeros(2, np.uint8))
  (tmp_path / "digit.png").write_bytes(png_bytes(Image.new("L", (9, 9))))
  assert digits_lib.is_idx(str(tmp_path / "a.gz"))
  assert digits_lib.is_idx(str(tmp_path / "digits"))
  assert digits_lib.is_idx(str(tmp_path / "labels-idx1-ubyte"))
  assert not digits_lib.is_idx(str(tmp_path / "digit.png"))
  with pytest.raises(digits_lib.DataError, match=r"not uint8 images \[N, 28"):
    digits_lib.read_digits(str(tmp_path / "labels-idx1-ubyte"))


def test_preprocessed_names_are_unique():
  image = np.zeros((28, 28), np.uint8)
  digits = [digits_lib.Digit("a/x.png", None, image),
            digits_lib.Digit("b/x.jpg", None, image),
            digits_lib.Digit("t10k-images-idx3-ubyte.gz", 0, image),
            digits_lib.Digit("t10k-images-idx3-ubyte.gz", 1, image)]
  assert list(predict.preprocessed_names(digits)) == [
      "x.png", "x-2.png", "t10k-images-idx3-ubyte-0.png",
      "t10k-images-idx3-ubyte-1.png"]


# --------------------------------------------------------------------------
# The command line, with a trained model


# Not the latest checkpoint (60): --step must reach the model.
STEP = 40


@pytest.fixture(scope="module")
def model(trained_workdir):
  return trained.load(trained_workdir, STEP)


@pytest.fixture(scope="module")
def chosen(test_set, model):
  """Four test digits that the model gets right with probability over 0.9,
  of as many classes as it is that sure of (at least three: the model of
  step 40 of the shared run may be sure of three only), and the model's
  probabilities for them."""
  images, labels = test_set
  probs = classification.softmax(model.predict_logits(images))
  sure = np.flatnonzero((probs.argmax(1) == labels) & (probs.max(1) > 0.9))
  first_of_class = [i for n, i in enumerate(sure)
                    if labels[i] not in labels[sure[:n]]]
  picked = (first_of_class + [i for i in sure
                              if i not in first_of_class])[:4]
  assert len(picked) == 4 and len(set(labels[picked])) >= 3, (
      "the shared model is not confident on 3 classes")
  return images[picked], probs[picked]


@pytest.fixture(scope="module")
def cli_run(trained_workdir, chosen, tmp_path_factory):
  """One run of the tool over every kind of file, good and bad."""
  images, _ = chosen
  directory = tmp_path_factory.mktemp("predict")
  files, expected = [], []  # expected: (file, index or None, original).
  for n, image in enumerate(images):
    for name, content in (
        (f"d{n}_white.png", png_bytes(white_on_black(image))),
        (f"d{n}_black.png", png_bytes(black_on_white(image))),
        (f"d{n}_blue.png", png_bytes(blue_on_yellow(image))),
        (f"d{n}.jpg", as_jpeg(image))):
      (directory / name).write_bytes(content)
      files.append(str(directory / name))
      expected.append((files[-1], None, n))
    if n == 1:  # The bad files among the good.
      whole = png_bytes(white_on_black(image))
      (directory / "cut.png").write_bytes(whole[:len(whole) // 2])
      Image.new("RGB", (60, 40), "white").save(directory / "blank.png")
      files += [str(directory / "cut.png"), str(directory / "blank.png")]
  idx_path = directory / "few-idx3-ubyte.gz"
  idx.write_idx(idx_path, images[::-1])
  files.append(str(idx_path))
  expected += [(str(idx_path), i, len(images) - 1 - i)
               for i in range(len(images))]
  saved = directory / "seen"
  proc = run_predict(f"--workdir={trained_workdir}", f"--step={STEP}",
                     f"--save_preprocessed={saved}", *files)
  return proc, expected, saved


def test_cli_gives_each_drawn_digit_the_originals_digit(cli_run, chosen):
  proc, expected, _ = cli_run
  _, probs = chosen
  lines = [json.loads(l) for l in proc.stdout.splitlines()]
  assert [(l["file"], l.get("index")) for l in lines] == [
      (f, i) for f, i, _ in expected], proc.stderr
  for line, (_, index, n) in zip(lines, expected):
    assert line["digit"] == int(probs[n].argmax()), line
    assert len(line["probabilities"]) == 10
    assert sum(line["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert all(p == round(p, 6) for p in line["probabilities"])
    if index is not None:  # Unchanged images: the same probabilities.
      np.testing.assert_allclose(line["probabilities"], probs[n], atol=2e-6)


def test_cli_reports_bad_files_and_predicts_the_rest(cli_run):
  proc, _, _ = cli_run
  assert proc.returncode == 2, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 2, proc.stderr
  assert errors[0].startswith("error: ") and "cut.png: " in errors[0]
  assert "truncated" in errors[0]
  assert "blank.png: no digit" in errors[1]
  assert "Traceback" not in proc.stderr


def test_cli_saves_what_the_model_saw(cli_run, chosen):
  proc, expected, saved = cli_run
  lines = [json.loads(l) for l in proc.stdout.splitlines()]
  assert sorted(os.listdir(saved)) == sorted(
      os.path.basename(l["preprocessed"]) for l in lines)
  for line, (file, index, n) in zip(lines, expected):
    with Image.open(line["preprocessed"]) as png:
      seen = np.asarray(png)
    assert seen.shape == (28, 28) and seen.dtype == np.uint8
    if index is None:
      np.testing.assert_array_equal(
          seen, digits_lib.to_mnist(digits_lib.read_grey(file)))
    else:
      np.testing.assert_array_equal(seen, chosen[0][n])


@pytest.mark.parametrize("args, message", [
    (("--workdir={workdir}",), "no FILE given"),
    (("--workdir={workdir}", "--step=newest", "{good}"),
     "--step='newest': must be latest, best or a step number"),
    (("--workdir={workdir}", "{good}", "{missing}"), "missing.png: no such "
     "file"),
    # The file is checked before the workdir: nothing is loaded for it.
    (("--workdir={tmp}/nowhere", "{missing}"), "missing.png: no such file"),
    (("--workdir={tmp}/nowhere", "{good}"), "nowhere: no such workdir"),
    (("{good}",), "--workdir"),
], ids=["no-files", "bad-step", "missing-file", "missing-before-workdir",
        "bad-workdir", "no-workdir"])
def test_cli_argument_errors_are_one_line(trained_workdir, tmp_path, args,
                                          message):
  good = tmp_path / "good.png"
  good.write_bytes(png_bytes(Image.new("L", (9, 9))))
  values = {"workdir": trained_workdir, "tmp": tmp_path, "good": good,
            "missing": tmp_path / "missing.png"}
  proc = run_predict(*(a.format(**values) for a in args))
  assert proc.returncode == 2, proc.stderr
  assert proc.stdout == ""
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr
