"""The MAGVIT-v2 image tokenizer of inference and data preparation: one loader and one encoder.

`load_image_tokenizer` reads a `kind: "magvit"` parameter checkpoint (`mmada-jax convert` of the official weights, or
the output of `mmada-jax magvit`), checks its architecture against the config's `magvit` section and its code count
and image size against the vocabulary. `ImageTokenizer.encode` applies the official image transform
(`models.image_io`: resize the shorter side, centre crop, [-1, 1]) and returns code indices; `decode` returns uint8
pixels. The samplers, `mmada-jax prepare`, the online encoder of the training pipeline and the RL image rewards all
use this one path, so that the same image always gives the same codes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mmada_jax import checkpoint as ckpt
from mmada_jax.convert import magvit as magvit_convert
from mmada_jax.inference.errors import InferenceError
from mmada_jax.models import image_io, magvit


@dataclasses.dataclass
class ImageTokenizer:
  """uint8 pixels <-> MAGVIT-v2 codes (jitted encode / decode)."""
  model: magvit.MagvitV2
  params: Any
  resolution: int
  resize_mode: str
  source: str = ""

  @property
  def num_tokens(self) -> int:
    """Codes per image, N."""
    return (self.resolution // self.model.cfg.downsample_factor) ** 2

  def encode(self, images: Sequence[Any]) -> np.ndarray:
    """Images (paths, PIL images or uint8 [H, W, 3] arrays, resized / cropped to the tokenizer's resolution as the
    official transform does) -> int32 codes [B, N]."""
    try:
      x = image_io.load_images(images, self.resolution, self.resize_mode)
    except FileNotFoundError as e:
      raise InferenceError(str(e)) from None
    except OSError as e:  # PIL: not an image, truncated file
      raise InferenceError(f"cannot read image: {e}") from None
    return np.asarray(_encode(self.model, self.params, x)).astype(np.int32)

  def encode_one(self, image: np.ndarray) -> np.ndarray:
    """One uint8 image [H, W, 3] -> int32 codes [N] (the online encoder of the training pipeline)."""
    return self.encode([image])[0]

  def decode(self, codes: np.ndarray) -> np.ndarray:
    """Codes [B, N] -> uint8 images [B, H, W, 3] (official clamp-scale-truncate)."""
    return image_io.to_uint8(np.asarray(_decode(self.model, self.params, np.asarray(codes, np.int32))))


@functools.partial(jax.jit, static_argnums=0)
def _encode(model: magvit.MagvitV2, params: Any, x: jax.Array) -> jax.Array:
  return model.apply({"params": params}, x, method=magvit.MagvitV2.get_code)


@functools.partial(jax.jit, static_argnums=0)
def _decode(model: magvit.MagvitV2, params: Any, codes: jax.Array) -> jax.Array:
  return model.apply({"params": params}, codes, method=magvit.MagvitV2.decode_code)


def load_image_tokenizer(config, path: str | None = None, log: Callable[[str], None] = print) -> ImageTokenizer:
  """The MAGVIT-v2 checkpoint at `path` (default `data.image_tokenizer`), checked against the config's `magvit`
  section and vocabulary (codebook size, image tokens per image)."""
  path = path or config.data.image_tokenizer
  if not path:
    raise InferenceError("no image tokenizer: pass --magvit CKPT or --config.data.image_tokenizer=CKPT (a MAGVIT-v2 "
                         "parameter checkpoint)")
  params, cfg = magvit_convert.load_magvit(path, config.magvit)
  if cfg.codebook_size != config.vocab.codebook_size:
    raise ckpt.CheckpointError(f"{path}: {cfg.codebook_size} codes, but vocab.codebook_size="
                               f"{config.vocab.codebook_size}")
  tokens = (cfg.resolution // cfg.downsample_factor) ** 2
  if tokens != config.vocab.num_image_tokens:
    raise ckpt.CheckpointError(f"{path}: {cfg.resolution} px images give {tokens} codes, but "
                               f"vocab.num_image_tokens={config.vocab.num_image_tokens}")
  source = os.path.abspath(path)
  log(f"image tokenizer: {source}")
  return ImageTokenizer(magvit.MagvitV2(cfg), jax.device_put(params), int(cfg.resolution),
                        str(config.magvit.resize_mode), source)


def online_encoder(config) -> Callable[[np.ndarray], np.ndarray] | None:
  """uint8 [H, W, 3] -> int32 codes [N] with the checkpoint in `data.image_tokenizer`, or None when there is none
  (the training pipeline's online encoding, Decision 8)."""
  if not config.data.image_tokenizer:
    return None
  return load_image_tokenizer(config, None, log=lambda _: None).encode_one
