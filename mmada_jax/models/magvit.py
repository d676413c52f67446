"""MAGVIT-v2 image tokenizer: convolutional encoder, lookup-free quantiser (LFQ) and decoder (Flax Linen, NHWC).

Semantics follow the official Show-o / MMaDA tokenizer (specs/mmada-official.md §2, docs/parity.md §9):
  * GroupNorm with 32 contiguous channel groups, eps 1e-6; swish non-linearity.
  * ResnetBlock: conv1(swish(norm1 x)) -> conv2(swish(norm2 h)), 1x1 `nin_shortcut` iff the width changes.
  * Downsample: zero-pad right and bottom by one, then a 3x3 stride-2 VALID conv. Upsample: nearest x2, then 3x3 conv.
  * One single-head attention block in the middle of encoder and decoder (scale C^-0.5); per-level attention only at
    feature-map sizes listed in `attn_resolutions` (the official model lists none that occur).
  * LFQ: z_q = +1 where z > 0 else -1 (an exact 0 gives -1); code = sum_c 2^(C-1-c) [z_c > 0] (channel 0 = most
    significant bit); codes of an image are flattened in raster order p = y*w + x.

Parameter tree (the converter in `mmada_jax/convert/magvit.py` maps it to the official state-dict keys):
  encoder: conv_in, down_{i}/{block_{j}, attn_{j}, downsample/conv}, mid/{block_1, attn_1, block_2}, norm_out,
           conv_out, quant_conv
  decoder: post_quant_conv, conv_in, mid/{...}, up_{i}/{block_{j}, attn_{j}, upsample/conv}, norm_out, conv_out
The quantiser has no parameters (its `embedding` / `power_vals` buffers are recomputed from the bit count).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_PRECISIONS = {"default": None, "high": jax.lax.Precision.HIGH, "highest": jax.lax.Precision.HIGHEST}


@dataclasses.dataclass(frozen=True)
class MagvitConfig:
  """Architecture and quantiser settings; mirrors the `magvit` config section (mmada_jax/config.py)."""
  channels: int = 128
  in_channels: int = 3
  encoder_channel_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
  encoder_num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
  decoder_channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  decoder_num_res_blocks: tuple[int, ...] = (4, 4, 3, 4, 3)
  codebook_bits: int = 13
  resolution: int = 256
  attn_resolutions: tuple[int, ...] = (5,)
  norm_groups: int = 32
  norm_eps: float = 1e-6
  param_dtype: str = "float32"
  dtype: str = "float32"
  matmul_precision: str = "default"
  beta: float = 0.25
  commit_multiplier: float = 0.1
  entropy_multiplier: float = 0.1

  ARCH_FIELDS = ("channels", "in_channels", "encoder_channel_mult", "encoder_num_res_blocks", "decoder_channel_mult",
                 "decoder_num_res_blocks", "codebook_bits", "resolution", "attn_resolutions", "norm_groups", "norm_eps")

  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> "MagvitConfig":
    """Builds from the `magvit` config section (extra keys such as `train` are ignored)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name in section:
        v = section[f.name]
        kwargs[f.name] = tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else v
    return cls(**kwargs)

  @property
  def codebook_size(self) -> int:
    return 2 ** self.codebook_bits

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.encoder_channel_mult) - 1)

  def arch_dict(self) -> dict[str, Any]:
    """The architecture as JSON-friendly values (lists, not tuples): what checkpoint metadata records."""
    out = {}
    for k in self.ARCH_FIELDS:
      v = getattr(self, k)
      out[k] = list(v) if isinstance(v, tuple) else v
    return out

  def encoder_attn_levels(self) -> tuple[bool, ...]:
    """Whether encoder level i has per-level attention (feature size resolution / 2^i in attn_resolutions)."""
    return tuple((self.resolution >> i) in self.attn_resolutions for i in range(len(self.encoder_channel_mult)))

  def decoder_attn_levels(self) -> tuple[bool, ...]:
    return tuple((self.resolution >> i) in self.attn_resolutions for i in range(len(self.decoder_channel_mult)))


def _dtype(name: str):
  return jnp.dtype(name)


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


class _Base(nn.Module):
  """Shared constructors for convolutions and norms with the config's dtypes."""
  cfg: MagvitConfig

  def conv(self, features: int, kernel: int, name: str, strides: int = 1, padding: Any = "SAME") -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding, name=name,
                   dtype=_dtype(self.cfg.dtype), param_dtype=_dtype(self.cfg.param_dtype),
                   precision=_PRECISIONS[self.cfg.matmul_precision])

  def norm(self, name: str) -> nn.GroupNorm:
    # Two-pass variance, as PyTorch computes it: the one-pass E[x^2] - E[x]^2 form cancels when |mean| >> std.
    return nn.GroupNorm(num_groups=self.cfg.norm_groups, epsilon=self.cfg.norm_eps, name=name, dtype=jnp.float32,
                        param_dtype=_dtype(self.cfg.param_dtype), use_fast_variance=False)

  def act_dtype(self, x: jax.Array) -> jax.Array:
    return x.astype(_dtype(self.cfg.dtype))


class ResnetBlock(_Base):
  """Pre-norm residual block. [batch, height, width, in] -> [batch, height, width, features]."""
  features: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv(self.features, 3, "conv1")(self.act_dtype(swish(self.norm("norm1")(x))))
    h = self.conv(self.features, 3, "conv2")(self.act_dtype(swish(self.norm("norm2")(h))))
    if x.shape[-1] != self.features:
      x = self.conv(self.features, 1, "nin_shortcut")(self.act_dtype(x))
    return x + h


class AttnBlock(_Base):
  """Single-head self-attention over all positions (common_modules.AttnBlock). [b, h, w, c] -> [b, h, w, c]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    hn = self.act_dtype(self.norm("norm")(x))
    q, k, v = (self.conv(c, 1, n)(hn).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
    prec = _PRECISIONS[self.cfg.matmul_precision]
    scores = jnp.einsum("bqc,bkc->bqk", q, k, precision=prec, preferred_element_type=jnp.float32) * (c ** -0.5)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v, precision=prec).reshape(b, hh, ww, c)
    return x + self.conv(c, 1, "proj_out")(out)


class Downsample(_Base):
  """Asymmetric zero pad (bottom/right by one) then 3x3 stride-2 conv. [b, h, w, c] -> [b, h/2, w/2, c]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x.shape[-1], 3, "conv", strides=2, padding="VALID")(x)


class Upsample(_Base):
  """Nearest-neighbour x2 then 3x3 conv. [b, h, w, c] -> [b, 2h, 2w, c]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x.shape[-1], 3, "conv", padding=((1, 1), (1, 1)))(x)


class MidBlock(_Base):
  """block_1 -> attn_1 -> block_2 at the lowest resolution. [b, h, w, c] -> [b, h, w, c]."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(self.cfg, c, name="block_1")(x)
    x = AttnBlock(self.cfg, name="attn_1")(x)
    return ResnetBlock(self.cfg, c, name="block_2")(x)


class Level(_Base):
  """One resolution level: `num_blocks` ResnetBlocks (each followed by attention if `attn`), then resampling."""
  features: int = 0
  num_blocks: int = 0
  attn: bool = False
  resample: str = "none"  # "down", "up" or "none"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_blocks):
      x = ResnetBlock(self.cfg, self.features, name=f"block_{j}")(x)
      if self.attn:
        x = AttnBlock(self.cfg, name=f"attn_{j}")(x)
    if self.resample == "down":
      x = Downsample(self.cfg, name="downsample")(x)
    elif self.resample == "up":
      x = Upsample(self.cfg, name="upsample")(x)
    return x


class Encoder(_Base):
  """Images [batch, H, W, in_channels] in [-1, 1] -> latents z [batch, H/f, W/f, codebook_bits] (after quant_conv)."""

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.cfg
    mult, blocks, attn = cfg.encoder_channel_mult, cfg.encoder_num_res_blocks, cfg.encoder_attn_levels()
    h = self.conv(cfg.channels, 3, "conv_in")(self.act_dtype(images))
    last = len(mult) - 1
    for i in range(len(mult)):
      h = Level(cfg, cfg.channels * mult[i], blocks[i], attn[i], "down" if i != last else "none", name=f"down_{i}")(h)
    h = MidBlock(self.cfg, name="mid")(h)
    h = self.conv(cfg.codebook_bits, 3, "conv_out")(self.act_dtype(swish(self.norm("norm_out")(h))))
    return self.conv(cfg.codebook_bits, 1, "quant_conv")(h).astype(jnp.float32)


class Decoder(_Base):
  """Quantised latents [batch, h, w, codebook_bits] -> images [batch, h*f, w*f, in_channels] (not clamped)."""

  @nn.compact
  def __call__(self, zq: jax.Array) -> jax.Array:
    cfg = self.cfg
    mult, blocks, attn = cfg.decoder_channel_mult, cfg.decoder_num_res_blocks, cfg.decoder_attn_levels()
    h = self.conv(cfg.codebook_bits, 1, "post_quant_conv")(self.act_dtype(zq))
    h = self.conv(cfg.channels * mult[-1], 3, "conv_in")(h)
    h = MidBlock(self.cfg, name="mid")(h)
    # Official `up[i]` is indexed by level and run from the lowest resolution (last level) to level 0.
    for i in reversed(range(len(mult))):
      h = Level(cfg, cfg.channels * mult[i], blocks[i], attn[i], "up" if i != 0 else "none", name=f"up_{i}")(h)
    h = self.act_dtype(swish(self.norm("norm_out")(h)))
    return self.conv(cfg.in_channels, 3, "conv_out")(h).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Lookup-free quantiser


def lfq_quantize(z: jax.Array) -> jax.Array:
  """Hard sign quantisation: +1 where z > 0, else -1 (exact zeros -> -1). Same shape as z."""
  return jnp.where(z > 0, 1.0, -1.0).astype(z.dtype)


def codes_to_indices(z: jax.Array) -> jax.Array:
  """Latents (or quantised) [batch, h, w, bits] -> int32 code indices [batch, h*w] (raster order, MSB = channel 0)."""
  b, hh, ww, bits = z.shape
  powers = jnp.asarray(power_vals(bits), jnp.int32)
  idx = jnp.sum((z > 0).astype(jnp.int32) * powers, axis=-1)
  return idx.reshape(b, hh * ww)


def indices_to_codes(indices: jax.Array, bits: int, latent_hw: tuple[int, int] | None = None) -> jax.Array:
  """Code indices [batch, h*w] -> ±1 latents [batch, h, w, bits] (float32). Square latents unless `latent_hw`."""
  b, n = indices.shape
  if latent_hw is None:
    side = math.isqrt(n)
    if side * side != n:
      raise ValueError(f"indices of length {n} are not a square latent grid; pass latent_hw=(h, w)")
    latent_hw = (side, side)
  if latent_hw[0] * latent_hw[1] != n:
    raise ValueError(f"latent_hw={tuple(latent_hw)} does not hold {n} codes")
  shifts = jnp.arange(bits - 1, -1, -1, dtype=jnp.int32)
  bit = (indices.astype(jnp.int32)[..., None] >> shifts) & 1
  return (bit.astype(jnp.float32) * 2.0 - 1.0).reshape(b, latent_hw[0], latent_hw[1], bits)


def power_vals(bits: int) -> np.ndarray:
  """The official `quantize.power_vals` buffer: int64 [bits] = 2^(bits-1) ... 1."""
  return (2 ** np.arange(bits - 1, -1, -1)).astype(np.int64)


def codebook_embedding(bits: int) -> np.ndarray:
  """The official `quantize.embedding` buffer: float32 [2^bits, bits], row i = the ±1 bits of i, MSB first."""
  idx = np.arange(2 ** bits, dtype=np.int64)[:, None]
  return (((idx >> np.arange(bits - 1, -1, -1)) & 1) * 2 - 1).astype(np.float32)


def _binary_entropy_terms(z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean per-element entropy and mean (over channels) entropy of the batch-averaged distribution, in nats."""
  zf = z.astype(jnp.float32).reshape(-1, z.shape[-1])
  logits = jnp.stack([-(zf - 1.0) ** 2, -(zf + 1.0) ** 2], axis=-1)  # [n, bits, 2]
  logp = jax.nn.log_softmax(logits, axis=-1)
  per_element = -jnp.sum(jnp.exp(logp) * logp, axis=-1).mean()
  avg = jnp.exp(logp).mean(axis=0)  # [bits, 2]
  # Probabilities are clamped to [eps, 1 - eps] before the log, as a categorical built from probabilities does.
  eps = jnp.finfo(jnp.float32).eps
  batch = -jnp.sum(avg * jnp.log(jnp.clip(avg, eps, 1.0 - eps)), axis=-1).mean()
  return per_element, batch


def lfq(z: jax.Array, beta: float = 0.25, commit_multiplier: float = 0.1,
        entropy_multiplier: float = 0.1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Quantises with a straight-through estimator and returns the LFQ training losses.

  Args:
    z: encoder output [batch, h, w, bits].
  Returns:
    zq: ±1 latents [batch, h, w, bits] whose gradient passes straight to z.
    aux: `quantizer_loss` = commit_multiplier * (mean((sg(zq) - z)^2) + beta * mean((zq_st - sg(z))^2)), whose value is
      commit_multiplier * (1 + beta) * mean((zq - z)^2); `entropy_loss` = entropy_multiplier * (mean per-element entropy
      - entropy of the mean distribution), logits [-(z-1)^2, -(z+1)^2] (docs/parity.md §9); `indices` [batch, h*w];
      `per_sample_entropy`, `codebook_entropy` (nats, unscaled).
  """
  hard = lfq_quantize(z)
  zq = z + jax.lax.stop_gradient(hard - z)
  sg = jax.lax.stop_gradient
  commit = jnp.mean((sg(zq) - z) ** 2) + beta * jnp.mean((zq - sg(z)) ** 2)
  per_element, batch = _binary_entropy_terms(z)
  aux = {
      "quantizer_loss": commit_multiplier * commit,
      "entropy_loss": entropy_multiplier * (per_element - batch),
      "per_sample_entropy": per_element,
      "codebook_entropy": batch,
      "indices": codes_to_indices(hard),
  }
  return zq, aux


# ----------------------------------------------------------------------------------------------------------------------
# The full tokenizer


class MagvitV2(nn.Module):
  """Encoder + LFQ + decoder. Parameters: {"encoder": ..., "decoder": ...}. Images are NHWC in [-1, 1]."""
  cfg: MagvitConfig

  def setup(self):
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training forward: images [b, H, W, c] -> (reconstruction [b, H, W, c], aux of `lfq` plus `z`)."""
    z = self.encoder(images)
    cfg = self.cfg
    zq, aux = lfq(z, cfg.beta, cfg.commit_multiplier, cfg.entropy_multiplier)
    return self.decoder(zq), {**aux, "z": z}

  def encode(self, images: jax.Array) -> jax.Array:
    """Images [b, H, W, c] -> encoder output z [b, H/f, W/f, bits] (continuous, after quant_conv)."""
    return self.encoder(images)

  def get_code(self, images: jax.Array) -> jax.Array:
    """Images [b, H, W, c] -> int32 code indices [b, (H/f)*(W/f)] (official `get_code`)."""
    return codes_to_indices(self.encoder(images))

  def decode(self, zq: jax.Array) -> jax.Array:
    """±1 latents [b, h, w, bits] -> images [b, h*f, w*f, c]."""
    return self.decoder(zq)

  def decode_code(self, indices: jax.Array, latent_hw: tuple[int, int] | None = None) -> jax.Array:
    """Code indices [b, h*w] -> images [b, h*f, w*f, c] (official `decode_code`; square grid unless latent_hw)."""
    return self.decoder(indices_to_codes(indices, self.cfg.codebook_bits, latent_hw))


def init_params(cfg: MagvitConfig, seed: int = 0) -> dict:
  """Fresh parameters {"encoder": ..., "decoder": ...} as numpy arrays in `param_dtype`.

  Conv kernels N(0, 1/fan_in) truncated at two standard deviations (Flax's lecun_normal), all biases 0, GroupNorm
  scales 1. Not PyTorch's default U(-1/sqrt(fan_in), ..) biases: the 1x1 `quant_conv` has fan_in = bits, so its bias
  rivals its input and most positions start with the same code (on 16 ToyWorld images, 2 distinct codes after 300
  steps with those biases, 10 with zero biases). Drawn with NumPy from the shapes (jitting the Linen init of this
  network costs tens of seconds on CPU).
  """
  rng = np.random.default_rng(seed)
  dtype = _dtype(cfg.param_dtype)
  shapes = param_shapes(cfg)
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  fan_in = {tuple(p.key for p in path[:-1]): int(np.prod(leaf.shape[:-1])) for path, leaf in flat
            if path[-1].key == "kernel"}  # conv kernels [kh, kw, in, out]: fan_in = kh * kw * in

  def draw(path, leaf):
    names = tuple(p.key for p in path)
    if names[-1] == "scale":
      return np.ones(leaf.shape, dtype)
    if names[-1] != "kernel":
      return np.zeros(leaf.shape, dtype)
    # Truncated normal with unit variance after truncation (0.8796 = std of N(0, 1) truncated to [-2, 2]).
    x = rng.standard_normal(leaf.shape)
    while (bad := np.abs(x) > 2).any():
      x[bad] = rng.standard_normal(int(bad.sum()))
    return (x / 0.8796 * fan_in[names[:-1]] ** -0.5).astype(dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=16)
def param_shapes(cfg: MagvitConfig) -> dict:
  """Parameter shapes/dtypes without allocating (jax.ShapeDtypeStruct tree)."""
  size = cfg.downsample_factor * 2
  images = jax.ShapeDtypeStruct((1, size, size, cfg.in_channels), jnp.float32)
  return jax.eval_shape(lambda x: MagvitV2(cfg).init(jax.random.key(0), x), images)["params"]
