"""Semi-autoregressive masked-diffusion text sampler of LLaDA / MMaDA (text answers and image-understanding answers).

Algorithm (specs/mmada-official.md §5.1, docs/parity.md §7): the answer region of `gen_length` [MASK]s is appended to
the prompt and filled block by block (`block_length` positions, left to right). Each block gets `steps_per_block`
model calls; the number of tokens revealed at each call follows the official `get_num_transfer_tokens` (the block's
masked count split evenly, the remainder one extra each on the first calls). At each call, per masked position, the
model proposes `x0 = argmax(logits + temperature * Gumbel)` over the FULL vocabulary (the official code does not
restrict it: it may propose [MASK] or an image id) and a confidence: the softmax probability of `x0` under the
un-noised logits (`low_confidence`) or a uniform draw (`random`). The `k` most confident masked positions up to the end
of the current block are written; written tokens are never re-masked.

Classifier-free guidance (§8.7): the unconditional copy has every original prompt position (padding included) set to
[MASK]; logits = un + (s + 1)(cond − un). Both copies run as one batch of 2B rows.

Differences from the official code, none of which changes the tokens where the official code is correct:
  * Logits are computed only for the current block (the LM head dominates at 134k vocabulary rows), from one
    `output="hidden"` call of the backbone. Positions BEFORE the block can only be chosen when a [MASK] token was
    written earlier (the full-vocabulary argmax can propose [MASK]); then, and only then, a `lax.cond` branch computes
    the head for the whole sequence, so the result is identical to the official full-sequence logits.
  * Confidences are fp32 (the official softmax is float64). The parity fixtures' smallest confidence gap at the top-k
    cut is 2.7e-4, far above fp32 round-off; the exact-trace tests check this. Gumbel noise is drawn in fp32.
  * Batches with left padding are correct (§5.1 item 5, §8.16): `prompt_mask` [B, P] is extended with ones over the
    generated region and turned into a key/query pair mask, so pads are invisible to every real token. The official
    `generate` does this too when given the full-length mask (fixture `s2`) but drops the mask on its guidance path;
    `mmu_generate` builds the pair mask from the prompt-length mask only. Here guidance keeps the pair mask in both
    copies, so a padded row gives the same tokens as the same prompt alone (rotary attention depends only on position
    differences, so absolute positions that include the pads do not matter).
  * The whole loop (blocks × steps) is one compiled program: `lax.while_loop` over blocks (early stop), `lax.while_loop`
    over the steps of a block, static shapes throughout.

Optional, approximate (changes tokens; off by default), both from the Fast-dLLM paper:
  * `threshold`: confidence-threshold parallel decoding: reveal every masked position of the block whose confidence
    exceeds the threshold, at least the most confident one; the number of model calls adapts to the model's certainty.
  * `dual_cache`: the first call of a block runs the whole sequence and keeps every layer's keys and values; the other
    calls of the block run only the block's K positions against those cached keys/values (prefix and suffix frozen
    for the block, the block's own keys/values fresh). Positions before the block are never revisited in this mode
    (a [MASK] the model proposed there stays). Both calls are modes of the backbone itself (`llada.Transformer`'s
    `return_cache` and `kv_cache`/`window_start`/`window` arguments).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.models import layers, llada

Array = jax.Array
REMASKING = ("low_confidence", "random")


@dataclasses.dataclass(frozen=True)
class TextSampling:
  """Static settings of one text sampler program (hashable; a new value compiles a new program).

  Attributes:
    gen_length: G, number of generated positions (a multiple of `block_length`).
    block_length: K, positions per semi-autoregressive block.
    steps: model calls in total (a multiple of G / K); `steps / (G / K)` per block.
    temperature: Gumbel temperature τ of the token proposal (0 = argmax).
    cfg_scale: classifier-free guidance s (0 = off); logits = un + (s + 1)(cond − un).
    remasking: "low_confidence" (official default) or "random" confidences.
    stop_token: early stop after a block whose last token is this id in every row (official
      `mmu_generate_fast`, §5.1 item 4); None = always generate every block. Skipped blocks stay [MASK].
    threshold: None = the official fixed schedule; a probability in (0, 1) = confidence-threshold parallel decoding
      (approximate, see the module docstring); then `steps` is ignored and each block takes 1..K calls.
    dual_cache: approximate key/value cache refreshed at the start of every block (module docstring).
    trace: also return `x` at the start of every model call (`trace_x`, for parity tests).
  """
  gen_length: int = 128
  block_length: int = 128
  steps: int = 128
  temperature: float = 0.0
  cfg_scale: float = 0.0
  remasking: str = "low_confidence"
  stop_token: int | None = None
  threshold: float | None = None
  dual_cache: bool = False
  trace: bool = False

  def __post_init__(self):
    problems = []
    for name in ("gen_length", "block_length", "steps"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        problems.append(f"{name} must be a positive integer, got {value!r}")
    if not problems:
      if self.gen_length % self.block_length:
        problems.append(f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}")
      elif self.threshold is None and self.steps % (self.gen_length // self.block_length):
        problems.append(f"steps={self.steps} is not a multiple of the number of blocks "
                        f"gen_length/block_length={self.gen_length // self.block_length}")
    if not self.temperature >= 0:
      problems.append(f"temperature must be >= 0, got {self.temperature!r}")
    if not self.cfg_scale >= 0:
      problems.append(f"cfg_scale must be >= 0, got {self.cfg_scale!r}")
    if self.remasking not in REMASKING:
      problems.append(f"remasking must be one of {REMASKING}, got {self.remasking!r}")
    if self.threshold is not None and not 0 < self.threshold < 1:
      problems.append(f"threshold must be None or in (0, 1), got {self.threshold!r}")
    if self.threshold is not None and self.remasking != "low_confidence":
      problems.append("threshold decoding compares model confidences: it needs remasking='low_confidence'")
    if problems:
      raise ValueError("invalid TextSampling: " + "; ".join(problems))

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    """Model calls per block (the maximum, `block_length`, under threshold decoding)."""
    return self.block_length if self.threshold is not None else self.steps // self.num_blocks

  @property
  def max_calls(self) -> int:
    return self.num_blocks * self.steps_per_block

  @property
  def stochastic(self) -> bool:
    return self.temperature > 0 or self.remasking == "random"

  @classmethod
  def from_config(cls, text_section: Mapping[str, Any], eot_id: int | None = None, **overrides) -> "TextSampling":
    """From a `config.sampling.text` section; `stop_at_eot` needs `eot_id` (`vocab.eot_id`), threshold 0 = off.

    Keywords override fields (e.g. `trace=True`).
    """
    values = {f.name: text_section[f.name] for f in dataclasses.fields(cls) if f.name in text_section}
    if values.get("threshold") is not None and values["threshold"] <= 0:
      values["threshold"] = None
    if text_section.get("stop_at_eot", False):
      if eot_id is None:
        raise ValueError("sampling.text.stop_at_eot is set: pass eot_id (vocab.eot_id) to TextSampling.from_config")
      values["stop_token"] = int(eot_id)
    values.update(overrides)
    return cls(**values)


def transfer_counts(n_masked: Array, steps: int) -> Array:
  """Official `get_num_transfer_tokens`: [B] masked counts of a block -> [B, steps] tokens revealed per call.

  Each call reveals `n // steps`, the first `n % steps` calls one more (so the counts sum to n).
  """
  n = n_masked.astype(jnp.int32)[:, None]
  return n // steps + (jnp.arange(steps, dtype=jnp.int32)[None] < n % steps).astype(jnp.int32)


def propose(logits: Array, key: Array, settings: TextSampling) -> tuple[Array, Array]:
  """Token proposal and confidence for logits [B, n, V] (fp32) -> (x0 [B, n] int32, conf [B, n] fp32).

  x0 = argmax(logits + τ·Gumbel), the official `add_gumbel_noise` (exp(l) / (−log U)^τ) in log form, i.e. a draw from
  softmax(l / τ). conf = softmax(l)[x0] (un-noised, un-tempered, as officially) or U(0, 1) for "random".
  """
  logits = logits.astype(jnp.float32)
  k_gumbel, k_conf = jax.random.split(key)
  scores = logits
  if settings.temperature > 0:
    scores = logits + jnp.float32(settings.temperature) * jax.random.gumbel(k_gumbel, logits.shape, jnp.float32)
  x0 = layers.argmax_last(scores)
  if settings.remasking == "random":
    return x0, jax.random.uniform(k_conf, x0.shape, jnp.float32)
  chosen = jnp.take_along_axis(logits, x0[..., None], axis=-1)[..., 0]
  conf = jnp.exp(chosen - jax.nn.logsumexp(logits, axis=-1))
  return x0, conf


@dataclasses.dataclass
class _Forward:
  """What the loop body closes over. The backbone and the LM head are split so that the head runs only where logits
  are needed (one backbone call per step).

  prompt_index [B, L] bool: the official `prompt_index` (non-[MASK] at the start). pad [B, L] bool or None.
  """
  model: llada.Transformer
  params: Any
  settings: TextSampling
  mask_id: int
  key: Array
  prompt_index: Array
  pad: Array | None

  @property
  def kernel(self) -> Array:
    return llada.head_kernel(self.params)

  def inputs(self, x: Array) -> tuple[Array, Array | None]:
    """The model's batch: x [B, L], with guidance followed by its unconditional copy (every original prompt
    position [MASK], §5.1) -> ids [B or 2B, L] and the padding mask to match."""
    if self.settings.cfg_scale <= 0:
      return x, self.pad
    un_x = jnp.where(self.prompt_index, self.mask_id, x)
    return jnp.concatenate([x, un_x], axis=0), None if self.pad is None else jnp.concatenate([self.pad] * 2, axis=0)

  def hidden(self, x: Array) -> Array:
    """Final hidden states [B or 2B, L, D] of `inputs(x)`."""
    ids, pad = self.inputs(x)
    return self.model.apply({"params": self.params}, ids, pad, output="hidden")

  def hidden_cached(self, x: Array, start: Array, step: Array, cache: tuple) -> tuple[Array, tuple]:
    """`dual_cache`: hidden states of the block [B or 2B, K, D] and the cache; the block's first call refreshes it."""
    ids, pad = self.inputs(x)
    width = self.settings.block_length
    apply = functools.partial(self.model.apply, {"params": self.params}, ids, pad, output="hidden")

    def refresh(cache):  # the whole sequence: every layer's keys/values
      h, cache = apply(return_cache=True)
      return jax.lax.dynamic_slice_in_dim(h, start, width, axis=1), cache

    def reuse(cache):  # the block only, against the cache of the block's first call (kept as it is)
      return apply(kv_cache=cache, window_start=start, window=width), cache

    return jax.lax.cond(step == 0, refresh, reuse, cache)

  def logits(self, h: Array) -> Array:
    """Guided logits [B, n, V] (fp32) from hidden states [B or 2B, n, D] at the positions of interest."""
    logits = llada.head_logits(self.kernel, h, self.model.args)
    if self.settings.cfg_scale <= 0:
      return logits
    cond, un = jnp.split(logits, 2, axis=0)
    return un + jnp.float32(self.settings.cfg_scale + 1.0) * (cond - un)  # official algebra (§8.7)


def _candidates(fwd: _Forward, h_blk: Array, h: Array | None, x: Array, start: Array,
                key: Array) -> tuple[Array, Array]:
  """x0 [B, L] (x outside the candidates) and conf [B, L] (fp32, -inf outside) for positions < start + K.

  The block [start, start + K) always comes from block-only logits (hidden states h_blk [B', K, D]); positions
  before it only matter when they still hold [MASK] (see the module docstring) and are then filled from the logits of
  the whole sequence h [B', L, D] (not available, None, under `dual_cache`).
  """
  s, batch, length = fwd.settings, x.shape[0], x.shape[1]
  k_blk, k_full = jax.random.split(key)
  x0_blk, conf_blk = propose(fwd.logits(h_blk), k_blk, s)
  x0 = jax.lax.dynamic_update_slice_in_dim(x, x0_blk, start, axis=1)
  conf = jax.lax.dynamic_update_slice_in_dim(jnp.full((batch, length), -jnp.inf, jnp.float32), conf_blk, start,
                                             axis=1)
  if h is None:
    return x0, conf
  before = jnp.arange(length)[None] < start

  def with_earlier(operands):
    x0, conf = operands
    x0_all, conf_all = propose(fwd.logits(h), k_full, s)
    return jnp.where(before, x0_all, x0), jnp.where(before, conf_all, conf)

  stale = jnp.any(before & (x == fwd.mask_id))
  return jax.lax.cond(stale, with_earlier, lambda operands: operands, (x0, conf))


def _reveal(x: Array, x0: Array, conf: Array, count: Array, max_count: int) -> Array:
  """Writes x0 at the `count[b]` most confident positions of each row. x/x0 [B, L], conf [B, L], count [B]."""
  _, idx = jax.lax.top_k(conf, max_count)
  chosen = jnp.arange(max_count)[None] < count[:, None]
  rows = jnp.arange(x.shape[0])[:, None]
  transfer = jnp.zeros(x.shape, bool).at[rows, idx].set(chosen)
  return jnp.where(transfer, x0, x)


def _block(fwd: _Forward, state: dict, prompt_len: int) -> dict:
  """Fills one block: up to `steps_per_block` calls (fewer under threshold decoding once the block is done)."""
  s = fwd.settings
  start = prompt_len + state["block"] * s.block_length
  positions = jnp.arange(state["x"].shape[1])[None]
  in_block = (positions >= start) & (positions < start + s.block_length)
  counts = transfer_counts(jnp.sum(in_block & (state["x"] == fwd.mask_id), axis=1), s.steps_per_block)

  def cond(carry):
    step, st = carry
    if s.threshold is None:
      return step < s.steps_per_block
    return (step < s.steps_per_block) & jnp.any(in_block & (st["x"] == fwd.mask_id))

  def body(carry):
    step, st = carry
    x = st["x"]
    mask_index = x == fwd.mask_id
    if s.trace:
      st = dict(st, trace=st["trace"].at[st["calls"]].set(x))
    if s.dual_cache:
      h_blk, cache = fwd.hidden_cached(x, start, step, st["cache"])
      h, st = None, dict(st, cache=cache)
    else:
      h = fwd.hidden(x)
      h_blk = jax.lax.dynamic_slice_in_dim(h, start, s.block_length, axis=1)
    x0, conf = _candidates(fwd, h_blk, h, x, start, jax.random.fold_in(fwd.key, st["calls"]))
    conf = jnp.where(mask_index & (positions < start + s.block_length), conf, -jnp.inf)
    x0 = jnp.where(mask_index, x0, x)
    if s.threshold is None:
      count = counts[:, step]
    else:  # everything above the threshold, at least the most confident position of a row that has one
      count = jnp.maximum(jnp.sum(conf > s.threshold, axis=1), jnp.any(jnp.isfinite(conf), axis=1))
    st = dict(st, x=_reveal(x, x0, conf, count, s.block_length), calls=st["calls"] + 1)
    return step + 1, st

  _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
  return dict(state, block=state["block"] + 1)


def _initial_state(model: llada.Transformer, prompt: Array, prompt_mask: Array | None, s: TextSampling,
                   mask_id: int) -> tuple[dict, Array | None]:
  """The sampler's state before the first block (x [B, P + G]: the prompt, then [MASK]s; counters; the trace and the
  dual cache when asked for) and the padding mask [B, P + G] (None without `prompt_mask`)."""
  batch = prompt.shape[0]
  x = jnp.concatenate([prompt.astype(jnp.int32), jnp.full((batch, s.gen_length), mask_id, jnp.int32)], axis=1)
  pad = None
  if prompt_mask is not None:
    pad = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((batch, s.gen_length), bool)], axis=1)
  state = {"x": x, "block": jnp.int32(0), "calls": jnp.int32(0)}
  if s.trace:
    state["trace"] = jnp.full((s.max_calls,) + x.shape, mask_id, jnp.int32)
  if s.dual_cache:
    a = model.args
    shape = (a.num_layers, batch * (2 if s.cfg_scale > 0 else 1), x.shape[1], a.num_kv_heads, a.head_dim)
    state["cache"] = (jnp.zeros(shape, a.dtype), jnp.zeros(shape, a.dtype))
  return state, pad


@functools.partial(jax.jit, static_argnames=("model", "settings", "mask_id"))
def _generate(model: llada.Transformer, params: Any, prompt: Array, prompt_mask: Array | None, key: Array, *,
              settings: TextSampling, mask_id: int) -> dict:
  s = settings
  prompt_len = prompt.shape[1]
  state, pad = _initial_state(model, prompt, prompt_mask, s, mask_id)
  params = llada.compute_params(params, model.args)  # bf16 compute: cast the weights once, not at every call
  fwd = _Forward(model, params, s, mask_id, key, prompt_index=state["x"] != mask_id, pad=pad)

  def cond(st):
    go = st["block"] < s.num_blocks
    if s.stop_token is not None:  # official `mmu_generate_fast`: stop once every row's last block token is the stop
      last = jnp.take(st["x"], prompt_len + st["block"] * s.block_length - 1, axis=1)
      go = go & ((st["block"] == 0) | ~jnp.all(last == s.stop_token))
    return go

  state = jax.lax.while_loop(cond, lambda st: _block(fwd, st, prompt_len), state)
  out = {"tokens": state["x"], "calls": state["calls"], "blocks": state["block"]}
  if s.trace:
    out["trace_x"] = state["trace"]
  return out


def generate(model: llada.Transformer, params: Any, prompt: Array, prompt_mask: Array | None = None, *,
             mask_id: int, settings: TextSampling, rng: Array | None = None) -> dict:
  """Generates `settings.gen_length` tokens after each prompt row; one compiled program per shape and settings.

  Args:
    model: the backbone (`llada.Transformer`); any layer layout and dtype.
    params: its parameters (`llada.init_params` or a checkpoint's tree, either layer layout), as device arrays
      (NumPy arrays would be copied to the device at every call).
    prompt: [B, P] int prompt ids; rows shorter than P are LEFT-padded (any pad id).
    prompt_mask: [B, P] (1/True = real token, 0 = padding) or None (no padding: no attention mask at all).
    mask_id: the [MASK] id (`vocab.mask_id`).
    settings: `TextSampling`.
    rng: PRNG key; required when sampling is stochastic (temperature > 0 or random remasking).

  Returns a dict:
    tokens   [B, P + G] int32: prompt and answer (positions of skipped blocks, after an early stop, stay [MASK]).
    calls    int32 scalar: model calls made (each one batch of B rows, or 2B with guidance).
    blocks   int32 scalar: blocks generated.
    trace_x  [max_calls, B, P + G] int32 (settings.trace only): `x` at the start of every call.
  """
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"prompt must be an integer array [batch, prompt_len], got {prompt.dtype} {prompt.shape}")
  if prompt_mask is not None:
    prompt_mask = jnp.asarray(prompt_mask)
    if prompt_mask.shape != prompt.shape:
      raise ValueError(f"prompt_mask has shape {prompt_mask.shape}, expected the prompt's {prompt.shape}")
  if rng is None:
    if settings.stochastic:
      raise ValueError("rng is required when temperature > 0 or remasking='random'")
    rng = jax.random.key(0)
  return _generate(model, params, prompt, prompt_mask, rng, settings=settings, mask_id=int(mask_id))


def stream_text(model, params, prompt, prompt_mask=None, *, mask_id: int, settings, rng=None) -> Iterator[tuple]:
  """`sampling_text.generate` one block at a time: yields (block index, tokens [B, P + G] np.int32) after every block.

  The tokens are those of `generate` with the same arguments: the state (sequence, call counter for the noise keys,
  early stop) is carried between the per-block programs exactly as the single program carries it.
  """
  s = dataclasses.replace(settings, trace=False)
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2:
    raise ValueError(f"prompt must be [batch, prompt_len], got shape {prompt.shape}")
  if rng is None:
    if s.stochastic:
      raise ValueError("rng is required when temperature > 0 or remasking='random'")
    rng = jax.random.key(0)
  prompt_len = prompt.shape[1]
  state, pad = _initial_state(model, jnp.asarray(prompt), None if prompt_mask is None else jnp.asarray(prompt_mask),
                              s, mask_id)
  prompt_index = state["x"] != mask_id
  for b in range(s.num_blocks):
    tokens = np.asarray(state["x"])
    if s.stop_token is not None and b > 0 and np.all(tokens[:, prompt_len + b * s.block_length - 1] == s.stop_token):
      return
    state = _one_block(model, params, state, prompt_index, pad, rng, settings=s, mask_id=int(mask_id),
                       prompt_len=prompt_len)
    yield b, np.asarray(state["x"])


@functools.partial(jax.jit, static_argnames=("model", "settings", "mask_id", "prompt_len"))
def _one_block(model, params, state, prompt_index, pad, key, *, settings, mask_id, prompt_len):
  # The loop body of `_generate`, one block per call.
  params = llada.compute_params(params, model.args)  # once per block program, as `_generate` does once per call
  fwd = _Forward(model, params, settings, mask_id, key, prompt_index=prompt_index, pad=pad)
  return _block(fwd, state, prompt_len)


def left_pad(prompts: list, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Batches prompts of different lengths for `generate`: (ids [B, P], mask [B, P]) left-padded with `pad_id` to the
  longest P (e.g. `Prompter.mmu_gen(...)["input_ids"]` rows for image-understanding answers)."""
  if not prompts:
    raise ValueError("left_pad needs at least one prompt")
  width = max(len(p) for p in prompts)
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    if len(p):
      ids[i, width - len(p):], mask[i, width - len(p):] = np.asarray(p), 1
  return ids, mask
