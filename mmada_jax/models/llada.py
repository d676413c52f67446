"""The LLaDA-8B / MMaDA backbone: a bidirectional pre-norm transformer over the joint text + image vocabulary.

Forward pass (specs/mmada-official.md §1.3): x = wte[ids]; per block x += attn(rms(x)); x += mlp(rms(x));
logits = rms_f(x) @ head. Parameter tree (stacked layout, `model.scan_layers=True`; leading `layers` axis on blocks):

  wte                                 [vocab, embed]
  blocks/attn_norm/scale              [layers, embed]
  blocks/attn/{q,k,v}_proj/kernel     [layers, embed, heads, head_dim]
  blocks/attn/attn_out/kernel         [layers, heads, head_dim, embed]
  blocks/ff_norm/scale                [layers, embed]
  blocks/mlp/{ff_proj,up_proj}/kernel [layers, embed, mlp]
  blocks/mlp/ff_out/kernel            [layers, mlp, embed]
  ln_f/scale                          [embed]
  lm_head/kernel                      [embed, vocab]

The unstacked layout (`scan_layers=False`) has `blocks_0`, `blocks_1`, ... without the leading axis.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmada_jax.models.layers import (MLP, Array, Attention, ModelArgs, RMSNorm, attention_bias_from_mask, rope_tables,
                                     stack_kernels)

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj", "out_proj",
                                                                   "mlp_out"),
}

ACT = ("activation_batch", "activation_length", "activation_embed")


class Block(nn.Module):
  """One LLaDA llama block.

  Call: (x [batch, n, embed], bias, sin, cos, kv_cache=None, start=None) -> (new hidden state, (the block's input
  when `collect` else None, the attention's own (k, v) each [batch, n, kv_heads, head_dim] when `cache` else None)).
  `kv_cache`/`start`: see `layers.Attention` (the window mode of `Transformer`).
  """
  args: ModelArgs
  collect: bool = False
  cache: bool = False

  @nn.compact
  def __call__(self, x: Array, bias: Array | None, sin: Array, cos: Array, kv_cache: tuple | None = None,
               start: Array | None = None):
    x_in = x
    h = RMSNorm(self.args, name="attn_norm")(x)
    out, kv = Attention(self.args, name="attn")(h, bias, sin, cos, kv_cache, start)
    x = x + out
    h = RMSNorm(self.args, name="ff_norm")(x)
    x = x + MLP(self.args, name="mlp")(h)
    x = nn.with_logical_constraint(x, ACT)
    return x, (x_in if self.collect else None, kv if self.cache else None)


def _block_class(args: ModelArgs, cache: bool = False):
  """The block, rematerialised by `args.remat_policy` (never in the inference-only cache modes)."""
  if args.remat_policy == "none" or cache:
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[args.remat_policy], prevent_cse=not args.scan_layers)


class LMHead(nn.Module):
  """Untied output projection [embed, vocab]; evaluated only on the hidden states it is given."""
  args: ModelArgs

  @nn.compact
  def __call__(self, h: Array) -> Array:
    a = self.args
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(a.d_model ** -0.5),
                                                               ("embed", "vocab")), (a.d_model, a.vocab_size),
                        a.param_dtype)
    return head_logits(kernel, h, a)


def head_logits(kernel: Array, h: Array, args: ModelArgs) -> Array:
  """Logits [..., vocab] in fp32 for final hidden states h [..., embed] (fp32 accumulation)."""
  return jnp.einsum("...d,dv->...v", h.astype(args.dtype), kernel.astype(args.dtype), precision=args.precision,
                    preferred_element_type=jnp.float32)


def head_kernel(params: Any) -> Array:
  """The LM head's kernel [embed, vocab] in a parameter tree (for `head_logits` on selected hidden states)."""
  return params["lm_head"]["kernel"]


class Transformer(nn.Module):
  """The MMaDA backbone.

  Call: `model.apply({"params": p}, ids, attention_mask, logits_at=..., output=...)`.
    ids             [batch, length] int token ids.
    attention_mask  see `layers.attention_bias_from_mask` (None, padding mask, bool pair mask or float bias).
    positions       [batch, length] rotary positions; default 0..length-1 (absolute, padding included).
    logits_at       [batch, k] int positions: logits only there → [batch, k, vocab] (never builds the full
                    [batch, length, vocab] tensor). None → logits at every position.
    output          "logits" (fp32 logits), "hidden" (final hidden states after ln_f, [batch, length, embed]) or
                    "all" (dict with logits and `hidden_states` [layers + 1, batch, length, embed]: the inputs of
                    every block, then the final normed state, as the official `output_hidden_states`).

  Cached decoding (inference only; no remat):
    return_cache    True → returns (out, cache): cache = (k, v) each [layers, batch, length, kv_heads, head_dim],
                    every layer's keys/values after RoPE, as attention consumed them ("prefill" without `kv_cache`).
    kv_cache        such a cache of the same ids' length: the "window" mode. Only the positions
                    [window_start, window_start + window) of `ids` are computed (their embeddings, RoPE at those
                    absolute positions); each layer writes the window's fresh keys/values over the cached ones at
                    `window_start` and attends over the whole length. `attention_mask` must be None or a
                    [batch, length] key padding mask; `output` "logits" or "hidden" for the window only
                    ([batch, window, ...]; `logits_at` indexes the window); with `return_cache` the returned cache
                    is `kv_cache` with the window's fresh keys/values written in.
    window_start    int scalar (may be traced); window: static int width.
  """
  args: ModelArgs

  @nn.compact
  def __call__(self, ids: Array, attention_mask: Array | None = None, *, positions: Array | None = None,
               logits_at: Array | None = None, output: str = "logits", return_cache: bool = False,
               kv_cache: tuple[Array, Array] | None = None, window_start: Array | None = None, window: int = 0):
    a = self.args
    if output not in ("logits", "hidden", "all"):
      raise ValueError(f"output must be 'logits', 'hidden' or 'all', got {output!r}")
    batch, length = ids.shape
    wte = self.param("wte", nn.with_logical_partitioning(nn.initializers.normal(a.d_model ** -0.5),
                                                         ("vocab", "embed")), (a.vocab_size, a.d_model),
                     a.param_dtype)
    if kv_cache is None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
      bias = attention_bias_from_mask(attention_mask, length)
    else:
      ids, positions, bias = _window_inputs(ids, attention_mask, positions, output, window_start, window)
    x = nn.with_logical_constraint(jnp.take(wte, ids, axis=0).astype(a.dtype), ACT)
    sin, cos = rope_tables(positions, a.head_dim, a.rope_theta)
    x, (block_inputs, kv) = self._blocks(x, bias, sin, cos, collect=output == "all",
                                         cache=return_cache or kv_cache is not None, kv_cache=kv_cache,
                                         start=window_start)
    out = self._head(x, output, logits_at, block_inputs)
    if not return_cache:
      return out
    if kv_cache is not None:  # the window's fresh keys/values written into the cache
      kv = tuple(jax.lax.dynamic_update_slice_in_dim(c, t.astype(c.dtype), window_start, axis=2)
                 for c, t in zip(kv_cache, kv))
    return out, kv

  def _head(self, x: Array, output: str, logits_at: Array | None, block_inputs: Array | None):
    """ln_f, then the requested output (see the class docstring) of the last block's output x [batch, n, embed]."""
    h = RMSNorm(self.args, name="ln_f")(x)
    if output == "hidden":
      return h
    head = LMHead(self.args, name="lm_head")
    if logits_at is not None:
      logits = head(jnp.take_along_axis(h, logits_at[..., None].astype(jnp.int32), axis=1))
    else:
      logits = head(h)
    if output == "logits":
      return logits
    return {"logits": logits, "hidden_states": jnp.concatenate([block_inputs, h[None]], axis=0)}

  def _blocks(self, x, bias, sin, cos, collect: bool, cache: bool, kv_cache: tuple | None, start: Array | None):
    """Runs the layers on x [batch, n, embed] -> (x, (block inputs [layers, batch, n, embed] or None, (k, v) each
    [layers, batch, n, kv_heads, head_dim] or None)); kv_cache (k, v) each [layers, batch, length, kv_heads,
    head_dim] is scanned along the layer axis (the window mode)."""
    a = self.args
    block_cls = _block_class(a, cache)
    extra = () if kv_cache is None else (kv_cache, start)
    if a.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast,) * 3 + ((0, nn.broadcast) if extra else ()), length=a.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      return scanned(a, collect, cache, name="blocks")(x, bias, sin, cos, *extra)
    inputs, kvs = [], []
    for i in range(a.num_layers):
      layer_extra = () if kv_cache is None else (tuple(c[i] for c in kv_cache), start)
      x, (x_in, kv) = block_cls(a, collect, cache, name=f"blocks_{i}")(x, bias, sin, cos, *layer_extra)
      inputs.append(x_in)
      kvs.append(kv)
    stacked_kv = tuple(jnp.stack(t) for t in zip(*kvs)) if cache else None
    return x, (jnp.stack(inputs) if collect else None, stacked_kv)


def _window_inputs(ids: Array, attention_mask: Array | None, positions: Array | None, output: str,
                   start: Array | None, window: int) -> tuple[Array, Array, Array | None]:
  """The window mode's inputs: ids and positions [batch, window] at [start, start + window) of ids/positions
  [batch, length] (positions None: start..start + window - 1), and the key padding bias [batch, 1, 1, length] (None
  without a mask)."""
  length = ids.shape[1]
  if start is None or not 0 < window <= length:
    raise ValueError(f"kv_cache needs window_start and a static window in [1, {length}], got {window!r}")
  if output == "all":
    raise ValueError("output='all' is not available with kv_cache")
  if attention_mask is not None and attention_mask.shape != ids.shape:
    raise ValueError(f"with kv_cache, attention_mask must be a [batch, length] padding mask {ids.shape}, got "
                     f"{attention_mask.shape}")
  bias = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
  cut = lambda t: jax.lax.dynamic_slice_in_dim(t, start, window, axis=1)
  if positions is None:
    positions = jnp.broadcast_to(start + jnp.arange(window, dtype=jnp.int32), (ids.shape[0], window))
  else:
    positions = cut(positions)
  return cut(ids), positions, bias


def compute_params(params: Any, args: ModelArgs) -> Any:
  """The parameters prepared for inference loops that call the model many times (call it inside the jitted program,
  outside the loop): cast to the compute dtype (`model.dtype`), and with the kernels that the layers multiply together
  stacked once (`layers.stack_kernels`; the modules accept either tree, in every mode).

  Exact: every use of a parameter casts it to the compute dtype first (matmul operands, RMSNorm scales, the embedding
  rows), so casting once up front gives the same numbers and saves re-reading fp32 master weights at every call.
  """
  if jnp.dtype(args.param_dtype) != jnp.dtype(args.dtype):
    params = jax.tree.map(lambda p: p.astype(args.dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
  return stack_kernels(params)


def build_model(model_config) -> Transformer:
  """The backbone for a `config.model` section."""
  return Transformer(ModelArgs.from_config(model_config))


@functools.partial(jax.jit, static_argnames=("model",))
def _init(model: Transformer, rng: Array, ids: Array):
  return model.init(rng, ids)


def init_params(model: Transformer, rng: Array, batch: int = 1, length: int = 8):
  """Unsharded random parameters (boxed logical metadata removed)."""
  variables = _init(model, rng, jnp.zeros((batch, length), jnp.int32))
  return nn.unbox(variables["params"])
