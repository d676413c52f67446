"""Image pre/post-processing: official resize/crop/squash semantics, [-1, 1] range, uint8 truncation, PNG grids."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image

from mmada_jax.data import sources
from mmada_jax.models import image_io


def _columns(width: int, height: int) -> np.ndarray:
  """uint8 [height, width, 3] whose red channel is 10 * column index (distinct per column)."""
  img = np.zeros((height, width, 3), np.uint8)
  img[..., 0] = (10 * np.arange(width))[None, :]
  img[..., 1] = 50
  return img


def test_uniform_colour_maps_exactly_to_minus_one_one():
  img = np.zeros((30, 50, 3), np.uint8)
  img[...] = (255, 0, 51)
  for mode in ("crop", "squash"):
    x = image_io.preprocess(img, 16, mode)
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(x[..., 1], -1.0, atol=1e-6)
    np.testing.assert_allclose(x[..., 2], 51 / 255 * 2 - 1, atol=1e-6)


def test_crop_offsets_round_half_to_even():
  # Shorter side already equals the resolution, so only the crop acts: (5 - 4) / 2 = 0.5 -> 0, (7 - 4) / 2 = 1.5 -> 2.
  for width, left in ((5, 0), (7, 2), (6, 1)):
    x = image_io.preprocess(_columns(width, 4), 4, "crop")
    red = np.rint((x[..., 0] + 1) / 2 * 255).astype(int)
    np.testing.assert_array_equal(red[0], 10 * np.arange(left, left + 4))
  tall = image_io.preprocess(np.transpose(_columns(7, 4), (1, 0, 2)), 4, "crop")  # rows play the columns' role
  np.testing.assert_array_equal(np.rint((tall[:, 0, 0] + 1) / 2 * 255).astype(int), 10 * np.arange(2, 6))


def test_crop_resizes_shorter_side_then_keeps_the_centre():
  img = np.zeros((40, 120, 3), np.uint8)
  img[:, :40] = (0, 0, 255)  # blue left third
  img[:, 40:80] = (255, 0, 0)  # red centre
  img[:, 80:] = (0, 0, 255)
  crop = image_io.preprocess(img, 20, "crop")  # 40x120 -> 20x60, centre 20x20 = the red part
  np.testing.assert_allclose(crop[:, 2:-2, 0], 1.0, atol=1e-6)
  squash = image_io.preprocess(img, 20, "squash")  # 20x20 of the whole picture: blue at both edges
  assert squash[0, 0, 2] > 0.9 and squash[0, -1, 2] > 0.9 and squash[0, 10, 0] > 0.9


def test_resize_matches_pil_bicubic_on_the_shorter_side():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  out = image_io.preprocess(img, 16, "crop")
  # Shorter side 37 -> 16, longer int(16 * 53 / 37) = 22; centre crop offset round(3.0) = 3.
  ref = Image.fromarray(img).resize((22, 16), Image.BICUBIC).crop((3, 0, 19, 16))
  np.testing.assert_allclose(out, np.asarray(ref, np.float32) / 255 * 2 - 1, atol=1e-6)


def test_to_uint8_truncates_like_the_official_code():
  x = np.array([-3.0, -1.0, 0.0, 0.999, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(image_io.to_uint8(x), [0, 0, 127, 254, 255, 255])


def test_grid_layout_and_png_round_trip(tmp_path):
  imgs = np.stack([np.full((2, 3, 3), v, np.uint8) for v in (10, 20, 30)])
  grid = image_io.make_grid(imgs, nrow=2, padding=1, pad_value=255)
  assert grid.shape == (2 * 2 + 3, 2 * 3 + 3, 3)
  assert grid[1, 1, 0] == 10 and grid[1, 5, 0] == 20 and grid[4, 1, 0] == 30 and grid[4, 5, 0] == 255
  assert grid[0, 0, 0] == 255
  path = image_io.save_grid(imgs.astype(np.float32) / 127.5 - 1, str(tmp_path / "sub" / "g.png"), nrow=2)
  back = np.asarray(Image.open(path))
  assert back.shape == (2 * 2 + 3 * 2, 2 * 3 + 3 * 2, 3)
  with Image.open(path) as im:
    assert im.format == "PNG"
  pairs = image_io.side_by_side(np.zeros((2, 4, 4, 3)), np.ones((2, 4, 4, 3)))
  assert pairs.shape == (4, 4, 4, 3) and pairs[0].max() == 127 and pairs[1].min() == 255


def test_bad_inputs_are_named(tmp_path):
  with pytest.raises(ValueError, match="resize mode"):
    image_io.preprocess(np.zeros((4, 4, 3), np.uint8), 4, "stretch")
  with pytest.raises(FileNotFoundError, match="nope.png"):
    image_io.preprocess(str(tmp_path / "nope.png"), 4)
  with pytest.raises(ValueError, match="uint8 array"):
    image_io.preprocess(np.zeros((4, 4), np.float32), 4)
  with pytest.raises(ValueError, match="uint8"):
    image_io.save_png(np.zeros((2, 2, 3), np.float32), str(tmp_path / "x.png"))


def test_paths_and_modes_load_as_batches(tmp_path):
  p = tmp_path / "a.png"
  Image.fromarray(_columns(24, 12), "RGB").convert("RGBA").save(p)  # RGBA files are read as RGB
  batch = image_io.load_images([str(p), _columns(24, 12)], 8, "crop")
  assert batch.shape == (2, 8, 8, 3)
  np.testing.assert_array_equal(batch[0], batch[1])


FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "image_transform_torchvision.npz")


def _noise(width: int, height: int) -> np.ndarray:
  """uint8 [height, width, 3] of seeded noise, the inputs the fixture was made from."""
  return np.random.default_rng([width, height]).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _decoded_to_unit_range(pixels: np.ndarray) -> np.ndarray:
  """uint8 [h, w, 3] -> float32 [-1, 1] with the same arithmetic as `image_io.preprocess`."""
  return (pixels.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def _through_both_call_sites(width: int, height: int, res: int) -> np.ndarray:
  """uint8 [res, res, 3] of `_noise(width, height)` from `sources.decode_image` (array and PNG bytes), after checking
  that `image_io.preprocess` gives the same pixels."""
  img = _noise(width, height)
  decoded = sources.decode_image(img, f"{width}x{height}", res)
  assert decoded.shape == (res, res, 3) and decoded.dtype == np.uint8, (width, height, res)
  png = io.BytesIO()
  Image.fromarray(img).save(png, "PNG")
  np.testing.assert_array_equal(sources.decode_image(png.getvalue(), "png", res), decoded)
  np.testing.assert_array_equal(image_io.preprocess(img, res, "crop"), _decoded_to_unit_range(decoded))
  return decoded


def test_resize_and_crop_match_torchvision_pixel_for_pixel():
  """Against torchvision 0.24.1 (Pillow 13.0.0): `Resize(res, interpolation=BICUBIC, antialias=True)` then
  `CenterCrop(res)` on `Image.fromarray(_noise(w, h))`. The fixture holds the uint8 [16, 16, 3] outputs of the small
  (w, h, res) cases and the sha256 of the uint8 [res, res, 3] outputs of the large ones. Both call sites (training
  data's `sources.decode_image`, inference's `image_io.preprocess`) must give them."""
  fix = np.load(FIXTURE)
  assert len(fix["small_cases"]) + len(fix["large_cases"]) == 18
  for (w, h, res), expected in zip(fix["small_cases"].tolist(), fix["small_pixels"]):
    np.testing.assert_array_equal(_through_both_call_sites(w, h, res), expected, err_msg=f"{w}x{h} @ {res}")
  for (w, h, res), digest in zip(fix["large_cases"].tolist(), fix["large_sha256"]):
    got = hashlib.sha256(_through_both_call_sites(w, h, res).tobytes()).hexdigest()
    assert got == digest.decode(), f"{w}x{h} @ {res}: pixels differ from torchvision's"


def test_resized_size_truncates_the_longer_side():
  # torchvision Resize(int): shorter side -> size, longer int(size * long / short) (truncated), no max_size.
  assert image_io.resized_size(335, 200, 256) == (428, 256)  # 428.8 -> 428 (rounding would give 429)
  assert image_io.resized_size(200, 335, 256) == (256, 428)
  assert image_io.resized_size(257, 256, 256) == (257, 256)  # already the right size: no resize at all
  assert image_io.resized_size(256, 256, 256) == (256, 256)
  assert image_io.resized_size(1000, 3, 256) == (85333, 256)
  assert image_io.resized_size(3, 1000, 256) == (256, 85333)
  assert image_io.resized_size(335, 200, 16) == (26, 16)  # 26.8 -> 26
  with pytest.raises(ValueError, match="0x5"):
    image_io.resized_size(0, 5, 4)


def test_center_crop_box_rounds_half_to_even():
  # torchvision CenterCrop: offsets int(round((side - crop) / 2)), Python's round (half to even).
  assert image_io.center_crop_box(428, 256, 256) == (86, 0, 342, 256)
  assert image_io.center_crop_box(257, 256, 256) == (0, 0, 256, 256)  # 0.5 -> 0
  assert image_io.center_crop_box(256, 259, 256) == (0, 2, 256, 258)  # 1.5 -> 2
  assert image_io.center_crop_box(23, 16, 16) == (4, 0, 20, 16)  # 3.5 -> 4 (a floor would give 3)
  assert image_io.center_crop_box(16, 21, 16) == (0, 2, 16, 18)  # 2.5 -> 2
  with pytest.raises(ValueError, match="smaller than the 16x16 crop"):
    image_io.center_crop_box(15, 40, 16)


def test_decode_image_conversions_feed_the_same_transform():
  # An RGBA picture is composited on white by decode_image, then resized and cropped by image_io's code path.
  rgba = np.concatenate([_noise(37, 29), np.full((29, 37, 1), 255, np.uint8)], axis=-1)
  notes = []
  out = sources.decode_image(rgba, "rgba", 16, notes)
  assert notes == ["converted:alpha"]
  np.testing.assert_array_equal(out, np.asarray(image_io.resize_center_crop(Image.fromarray(_noise(37, 29)), 16)))
