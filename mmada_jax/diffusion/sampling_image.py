"""MaskGIT-style text-to-image sampler of MMaDA (`MMadaModelLM.t2i_generate`, specs/mmada-official.md §5.2,
docs/parity.md §8).

Input: the t2i_gen layout `[iPAD]* <|t2i|> BOS text EOS <|soi|> [MASK] × N <|eoi|>` (`Prompter.t2i_gen`). Each of the
`timesteps` steps, per row:
  1. logits at the N image positions, restricted to the image codebook (ids image_offset .. image_offset + C − 1); with
     guidance g > 0, logits = (1 + g)·cond − g·uncond (MUSE algebra, §8.7), where the unconditional row is the null
     prompt's text prefix followed by the CURRENT conditional image part (rebuilt every step);
  2. probs = softmax(logits) (fp32); a code is drawn for every slot (Gumbel-max, `argmax(log probs + G)`, the same
     distribution as the official `torch.multinomial`); slots already known keep their code;
  3. mask_len = clamp(floor(N · schedule((step + 1) / S)), 1, #unknown − 1) (float32 arithmetic, as officially);
  4. confidence = log(max(probs[code], 1e-20)) + T_step · G' (known slots: float32 max); the mask_len least confident
     slots are re-masked (`conf < sort(conf)[mask_len]`, official `mask_by_random_topk`);
returning the codes drawn at the LAST step (all N filled; the last re-masking is irrelevant, §5.2).

Temperature T_step: "cumulative" (official default, inherited from Show-o, §8.6): T ← T·(1 − ratio) is overwritten each
step, so T_k = T0 ∏_{j ≤ k}(1 − (j + 1)/S); "linear" (MaskGIT's own): T_k = T0·(1 − (k + 1)/S).

Differences from the official code, none of which changes its result:
  * The text-prefix length used to build the unconditional row is the TRUE one, L − N − 2 (everything before
    `<|soi|>`), not the hard-coded `resolution = 512` that is only right for S = 512 (§8.8). It can be overridden.
  * The LM head runs only at the N image positions and only on the C codebook columns of its kernel.
  * The noise can be injected (`noise=`): the per-step Gumbel arrays of the parity fixtures reproduce the official run
    exactly; otherwise it is drawn in fp32 from a PRNG key, one step at a time inside the loop.
  * The whole loop is one compiled program (`lax.fori_loop`, static shapes); the schedule tables (mask_len and the
    per-step temperature) are computed on the host from static settings, in the official float32/float64 arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.models import layers, llada

Array = jax.Array
SCHEDULES = ("cosine", "linear")
ANNEALING = ("cumulative", "linear")


@dataclasses.dataclass(frozen=True)
class ImageSampling:
  """Static settings of one text-to-image sampler program (hashable).

  Attributes:
    timesteps: S, model calls (15 in the official demos).
    guidance_scale: g (0 = no guidance; official demos 3.5).
    temperature: T0 of the re-masking noise (official default 1.0).
    noise_schedule: "cosine" (official) or "linear" mask ratio of step k: schedule((k + 1) / S).
    temperature_annealing: "cumulative" (official) or "linear" (MaskGIT).
    sample_temperature: temperature of the token draw at each step: argmax(log p + τ·Gumbel), i.e. a draw from
      p^(1/τ). 1.0 is the official categorical draw; 0 takes the most likely code (greedy); values in between sharpen
      the draw (MaskGIT / Muse practice), which small, weak models need to avoid speckled images.
    trace: also return the per-step trace (input ids fed to the model, masking, mask_len).
  """
  timesteps: int = 15
  guidance_scale: float = 0.0
  temperature: float = 1.0
  noise_schedule: str = "cosine"
  temperature_annealing: str = "cumulative"
  sample_temperature: float = 1.0
  trace: bool = False

  def __post_init__(self):
    problems = []
    if not isinstance(self.timesteps, (int, np.integer)) or self.timesteps <= 0:
      problems.append(f"timesteps must be a positive integer, got {self.timesteps!r}")
    if not self.guidance_scale >= 0:
      problems.append(f"guidance_scale must be >= 0, got {self.guidance_scale!r}")
    if not self.temperature >= 0:
      problems.append(f"temperature must be >= 0, got {self.temperature!r}")
    if not self.sample_temperature >= 0:
      problems.append(f"sample_temperature must be >= 0, got {self.sample_temperature!r}")
    if self.noise_schedule not in SCHEDULES:
      problems.append(f"noise_schedule must be one of {SCHEDULES}, got {self.noise_schedule!r}")
    if self.temperature_annealing not in ANNEALING:
      problems.append(f"temperature_annealing must be one of {ANNEALING}, got {self.temperature_annealing!r}")
    if problems:
      raise ValueError("invalid ImageSampling: " + "; ".join(problems))

  @classmethod
  def from_config(cls, image_section: Mapping[str, Any], **overrides) -> "ImageSampling":
    """From a `config.sampling.image` section; keywords override."""
    values = {f.name: image_section[f.name] for f in dataclasses.fields(cls) if f.name in image_section}
    values.update(overrides)
    return cls(**values)


def mask_len_table(settings: ImageSampling, num_tokens: int) -> np.ndarray:
  """[S] int32: floor(N · schedule((k + 1) / S)) before the per-row clamp, in the official float32 arithmetic.

  The official code evaluates `cos(torch.tensor(ratio) * pi / 2)` in float32; at ratio 2/3 this is 0.49999997, so
  N = 64 gives 31, not 32. The cosine of the float32 argument is taken in float64 and rounded once (correct rounding).
  """
  out = []
  for k in range(settings.timesteps):
    ratio = np.float32((k + 1) / settings.timesteps)
    if settings.noise_schedule == "cosine":
      arg = np.float32(np.float32(ratio * np.float32(math.pi)) / np.float32(2.0))
      mask_ratio = np.float32(math.cos(float(arg)))
    else:
      mask_ratio = np.float32(np.float32(1.0) - ratio)
    out.append(math.floor(np.float32(np.float32(num_tokens) * mask_ratio)))
  return np.asarray(out, np.int32)


def temperature_table(settings: ImageSampling) -> np.ndarray:
  """[S] float64: the re-masking temperature of each step (official: Python floats, cumulative product)."""
  temps, t = [], float(settings.temperature)
  for k in range(settings.timesteps):
    ratio = 1.0 * (k + 1) / settings.timesteps
    t = t * (1.0 - ratio) if settings.temperature_annealing == "cumulative" else settings.temperature * (1.0 - ratio)
    temps.append(t)
  return np.asarray(temps, np.float64)


def step_noise(key: Array, step: Array, batch: int, num_tokens: int, codebook_size: int) -> tuple[Array, Array]:
  """fp32 standard Gumbel noise of one step, drawn on the fly (a whole run at 8B scale, S x N x 8192, is too big to
  draw up front): (token draw [B, N, C], re-masking [B, N])."""
  k_sample, k_mask = jax.random.split(jax.random.fold_in(key, step))
  return (jax.random.gumbel(k_sample, (batch, num_tokens, codebook_size), jnp.float32),
          jax.random.gumbel(k_mask, (batch, num_tokens), jnp.float32))


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static facts of the sequence: image slots [first, first + N), the codebook columns and the text prefix."""
  num_tokens: int
  codebook_size: int
  image_offset: int
  mask_id: int
  prefix_len: int
  length: int

  @property
  def first(self) -> int:
    return self.length - self.num_tokens - 1


def _image_logits(model, params, ids: Array, mask: Array | None, layout: _Layout, guidance: float) -> Array:
  """Guided codebook logits [B, N, C] (fp32). ids [B or 2B, L]; with guidance the uncond rows follow the cond rows."""
  h = model.apply({"params": params}, ids, mask, output="hidden")
  h_img = h[:, layout.first:layout.first + layout.num_tokens]
  kernel = llada.head_kernel(params)[:, layout.image_offset:layout.image_offset + layout.codebook_size]
  logits = llada.head_logits(kernel, h_img, model.args)
  if guidance <= 0:
    return logits
  cond, un = jnp.split(logits, 2, axis=0)
  return jnp.float32(1.0 + guidance) * cond - jnp.float32(guidance) * un  # official (1+g)·cond − g·uncond


def _step(k: Array, state: dict, ctx: dict, layout: _Layout, settings: ImageSampling) -> dict:
  """One MaskGIT step (module docstring, items 1-4) on state {ids [B, L], codes [B, N], sampled [B, N], ...}."""
  ids, codes = state["ids"], state["codes"]
  mask = ctx["mask"]
  if settings.guidance_scale > 0:
    un_ids = jnp.concatenate([ctx["un_ids"][:, :layout.prefix_len], ids[:, layout.prefix_len:]], axis=1)
    ids_in = jnp.concatenate([ids, un_ids], axis=0)
    mask = None if mask is None else jnp.concatenate([mask, ctx["un_mask"]], axis=0)
  else:
    ids_in = ids
  probs = jax.nn.softmax(_image_logits(ctx["model"], ctx["params"], ids_in, mask, layout, settings.guidance_scale))
  if ctx["noise"] is None:
    noise_sample, noise_mask = step_noise(ctx["key"], k, ids.shape[0], layout.num_tokens, layout.codebook_size)
  else:
    noise_sample, noise_mask = ctx["noise"]["sample"][k], ctx["noise"]["mask"][k]
  if settings.sample_temperature != 1.0:  # static: the official draw (τ = 1) keeps its exact arithmetic
    noise_sample = noise_sample * jnp.float32(settings.sample_temperature)
  sampled = layers.argmax_last(jnp.log(probs) + noise_sample)
  unknown = codes == layout.mask_id
  sampled = jnp.where(unknown, sampled, codes)
  selected = jnp.take_along_axis(probs, sampled[..., None], axis=-1)[..., 0]
  selected = jnp.where(unknown, selected, jnp.finfo(jnp.float32).max)
  mask_len = jnp.maximum(1, jnp.minimum(jnp.sum(unknown, axis=-1) - 1, ctx["mask_len"][k]))
  conf = jnp.log(jnp.maximum(selected, 1e-20)) + ctx["temperature"][k] * noise_mask
  cutoff = jnp.take_along_axis(jnp.sort(conf, axis=-1), mask_len[:, None], axis=-1)
  masking = conf < cutoff
  new_codes = jnp.where(masking, layout.mask_id, sampled)
  image_ids = jnp.where(masking, layout.mask_id, sampled + layout.image_offset)
  new = dict(state, ids=jax.lax.dynamic_update_slice_in_dim(ids, image_ids, layout.first, axis=1), codes=new_codes,
             sampled=sampled)
  if settings.trace:
    new["trace_input_ids"] = state["trace_input_ids"].at[k].set(ids)
    new["masking"] = state["masking"].at[k].set(masking)
    new["mask_len"] = state["mask_len"].at[k].set(mask_len)
  return new


@functools.partial(jax.jit, static_argnames=("model", "settings", "layout"))
def _t2i(model, params, input_ids, attention_mask, uncond_input_ids, uncond_attention_mask, noise, key, *,
         settings: ImageSampling, layout: _Layout) -> dict:
  batch, n = input_ids.shape[0], layout.num_tokens
  params = llada.compute_params(params, model.args)  # bf16 compute: cast the weights once, not at every step
  ids = input_ids.astype(jnp.int32)
  image = ids[:, layout.first:layout.first + n]
  codes = jnp.where(image == layout.mask_id, layout.mask_id, image - layout.image_offset)
  ctx = {"model": model, "params": params, "mask": attention_mask, "un_ids": uncond_input_ids,
         "un_mask": uncond_attention_mask, "noise": noise, "key": key,
         "mask_len": jnp.asarray(mask_len_table(settings, n)),
         "temperature": jnp.asarray(temperature_table(settings), jnp.float32)}
  state = {"ids": ids, "codes": codes, "sampled": codes}
  if settings.trace:
    s = settings.timesteps
    state.update(trace_input_ids=jnp.zeros((s,) + ids.shape, jnp.int32), masking=jnp.zeros((s, batch, n), bool),
                 mask_len=jnp.zeros((s, batch), jnp.int32))
  state = jax.lax.fori_loop(0, settings.timesteps, lambda k, st: _step(k, st, ctx, layout, settings), state)
  out = {"codes": state["sampled"], "final_input_ids": state["ids"]}
  if settings.trace:
    out.update(trace_input_ids=state["trace_input_ids"], masking=state["masking"], mask_len=state["mask_len"])
  return out


def _check_noise(noise: Mapping[str, Array], settings: ImageSampling, batch: int, n: int, c: int) -> dict:
  s = settings.timesteps
  sample, mask = jnp.asarray(noise["sample"], jnp.float32), jnp.asarray(noise["mask"], jnp.float32)
  if sample.shape not in ((s, batch * n, c), (s, batch, n, c)):
    raise ValueError(f"noise['sample'] has shape {sample.shape}, expected [{s}, {batch * n}, {c}] or "
                     f"[{s}, {batch}, {n}, {c}] (timesteps, batch·N or batch and N, codebook)")
  if mask.shape != (s, batch, n):
    raise ValueError(f"noise['mask'] has shape {mask.shape}, expected [{s}, {batch}, {n}] (timesteps, batch, N)")
  return {"sample": sample.reshape(s, batch, n, c), "mask": mask}


def t2i_generate(model: llada.Transformer, params: Any, input_ids: Array, attention_mask: Array | None = None,
                 uncond_input_ids: Array | None = None, uncond_attention_mask: Array | None = None, *,
                 mask_id: int, image_offset: int, codebook_size: int, num_image_tokens: int,
                 settings: ImageSampling, text_prefix_len: int | None = None, rng: Array | None = None,
                 noise: Mapping[str, Array] | None = None) -> dict:
  """Text-to-image token generation (official `MMadaModelLM.t2i_generate` semantics, module docstring).

  Args:
    model, params: the backbone and its parameters.
    input_ids: [B, L] t2i_gen layout, image slots [MASK] (or partly known image ids, which are kept).
    attention_mask: [B, L] 1 = real token, 0 = [iPAD] (turned into a key/query pair mask, as officially), or None.
    uncond_input_ids, uncond_attention_mask: [B, L] the null prompt's layout (`null_prompt`); needed for guidance.
    mask_id, image_offset, codebook_size, num_image_tokens: vocabulary facts (`image_vocab_args(vocab)`); the image
      slots are the N positions before the last one (`<|eoi|>`).
    settings: `ImageSampling`.
    text_prefix_len: positions taken from the null prompt in the unconditional row; default L − N − 2 (everything
      before `<|soi|>`), i.e. the official `resolution + 1` with the true prefix length instead of 512 + 1.
    rng: PRNG key for the noise, drawn step by step in fp32 (required unless `noise` is given).
    noise: injected standard Gumbel noise {"sample": [S, B·N, C] or [S, B, N, C], "mask": [S, B, N]}.

  Returns a dict:
    codes            [B, N] int32 in [0, C): the codes drawn at the last step (what the official function returns).
    final_input_ids  [B, L] int32: input_ids after the loop (the official in-place update; one [MASK] may remain).
    with settings.trace: trace_input_ids [S, B, L] (ids fed to the model at each step), masking [S, B, N] bool,
    mask_len [S, B] int32, temperature [S] float64 (NumPy, the temperature used at each step).
  """
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  batch, length = input_ids.shape
  n, c = int(num_image_tokens), int(codebook_size)
  if length < n + 3:
    raise ValueError(f"input_ids length {length} cannot hold num_image_tokens={n} plus <|soi|>, <|eoi|> and a prefix")
  prefix = length - n - 2 if text_prefix_len is None else int(text_prefix_len)
  if not 0 < prefix <= length - n - 1:
    raise ValueError(f"text_prefix_len={prefix} must be in [1, {length - n - 1}] for length {length}, N={n}")
  masks = {"attention_mask": attention_mask, "uncond_input_ids": uncond_input_ids,
           "uncond_attention_mask": uncond_attention_mask}
  for name, arr in masks.items():
    if arr is not None and tuple(jnp.shape(arr)) != (batch, length):
      raise ValueError(f"{name} has shape {tuple(jnp.shape(arr))}, expected input_ids' {(batch, length)}")
  if settings.guidance_scale > 0 and uncond_input_ids is None:
    raise ValueError("guidance_scale > 0 needs uncond_input_ids (the null prompt, see null_prompt())")
  if settings.guidance_scale > 0 and (attention_mask is None) != (uncond_attention_mask is None):
    raise ValueError("give both attention_mask and uncond_attention_mask, or neither")
  if noise is None and rng is None:
    raise ValueError("t2i_generate needs rng (a PRNG key) or injected noise")
  noise = None if noise is None else _check_noise(noise, settings, batch, n, c)
  rng = jax.random.key(0) if rng is None else rng  # unused when the noise is injected
  as_bool = lambda m: None if m is None else jnp.asarray(m).astype(bool)
  un_ids = None if settings.guidance_scale <= 0 else jnp.asarray(uncond_input_ids, jnp.int32)
  un_mask = None if settings.guidance_scale <= 0 else as_bool(uncond_attention_mask)
  layout = _Layout(num_tokens=n, codebook_size=c, image_offset=int(image_offset), mask_id=int(mask_id),
                   prefix_len=prefix, length=length)
  out = _t2i(model, params, input_ids, as_bool(attention_mask), un_ids, un_mask, noise, rng, settings=settings,
             layout=layout)
  if settings.trace:
    out["temperature"] = temperature_table(settings)
  return out


def image_vocab_args(vocab) -> dict:
  """The vocabulary keywords of `t2i_generate` from a `tokens.vocab.Vocab`."""
  return {"mask_id": vocab.mask_id, "image_offset": vocab.image_offset, "codebook_size": vocab.codebook_size,
          "num_image_tokens": vocab.num_image_tokens}


def null_prompt(prompter, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """The unconditional t2i_gen layout `[iPAD]* <|t2i|> BOS EOS <|soi|> [MASK]*N <|eoi|>` for guidance (§3.2):
  (ids [batch, L], attention mask [batch, L]) from a `tokens.prompting.Prompter`."""
  rec = prompter.t2i_gen([])
  return np.tile(rec["input_ids"], (batch, 1)), np.tile(rec["valid_mask"], (batch, 1))
