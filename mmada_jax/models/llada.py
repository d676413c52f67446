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
  """One LLaDA llama block. Returns (new hidden state, the block's input when `collect` else None)."""
  args: ModelArgs
  collect: bool = False

  @nn.compact
  def __call__(self, x: Array, bias: Array | None, sin: Array, cos: Array):
    x_in = x
    h = RMSNorm(self.args, name="attn_norm")(x)
    x = x + Attention(self.args, name="attn")(h, bias, sin, cos)
    h = RMSNorm(self.args, name="ff_norm")(x)
    x = x + MLP(self.args, name="mlp")(h)
    x = nn.with_logical_constraint(x, ACT)
    return x, (x_in if self.collect else None)


def _block_class(args: ModelArgs):
  if args.remat_policy == "none":
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
  """
  args: ModelArgs

  @nn.compact
  def __call__(self, ids: Array, attention_mask: Array | None = None, *, positions: Array | None = None,
               logits_at: Array | None = None, output: str = "logits"):
    a = self.args
    if output not in ("logits", "hidden", "all"):
      raise ValueError(f"output must be 'logits', 'hidden' or 'all', got {output!r}")
    batch, length = ids.shape
    wte = self.param("wte", nn.with_logical_partitioning(nn.initializers.normal(a.d_model ** -0.5),
                                                         ("vocab", "embed")), (a.vocab_size, a.d_model),
                     a.param_dtype)
    x = nn.with_logical_constraint(jnp.take(wte, ids, axis=0).astype(a.dtype), ACT)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    sin, cos = rope_tables(positions, a.head_dim, a.rope_theta)
    bias = attention_bias_from_mask(attention_mask, length)
    x, block_inputs = self._blocks(x, bias, sin, cos, collect=output == "all")
    h = RMSNorm(a, name="ln_f")(x)
    if output == "hidden":
      return h
    head = LMHead(a, name="lm_head")
    if logits_at is not None:
      logits = head(jnp.take_along_axis(h, logits_at[..., None].astype(jnp.int32), axis=1))
    else:
      logits = head(h)
    if output == "logits":
      return logits
    return {"logits": logits, "hidden_states": jnp.concatenate([block_inputs, h[None]], axis=0)}

  def _blocks(self, x, bias, sin, cos, collect: bool):
    a = self.args
    block_cls = _block_class(a)
    if a.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=a.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      return scanned(a, collect, name="blocks")(x, bias, sin, cos)
    inputs = []
    for i in range(a.num_layers):
      x, x_in = block_cls(a, collect, name=f"blocks_{i}")(x, bias, sin, cos)
      inputs.append(x_in)
    return x, (jnp.stack(inputs) if collect else None)


def compute_params(params: Any, args: ModelArgs) -> Any:
  """The parameters prepared for inference loops that call the model many times (call it inside the jitted program,
  outside the loop): cast to the compute dtype (`model.dtype`), and with the kernels that the layers multiply together
  stacked once (`layers.stack_kernels`; the modules and `sampling_text.cached_forward` accept either tree).

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
