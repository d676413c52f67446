"""Backbone behaviour beyond parity: layouts, remat, dtypes, masks, logical axis names."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmada_jax import config as config_lib
from mmada_jax.models import llada
from mmada_jax.parallel import partitioning

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "tiny.py")


def tiny(**overrides):
  return config_lib.load_config(TINY, {f"model.{k}": str(v) for k, v in overrides.items()}).model


def unstack(params, num_layers):
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(num_layers):
    out[f"blocks_{i}"] = jax.tree.map(lambda x: x[i], params["blocks"])
  return out


@pytest.fixture(scope="module")
def setup():
  m = tiny()
  model = llada.build_model(m)
  params = llada.init_params(model, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, m.vocab_size)
  return m, model, params, ids


def test_stacked_and_unstacked_agree(setup):
  m, model, params, ids = setup
  flat = llada.build_model(tiny(scan_layers=False))
  a = model.apply({"params": params}, ids)
  b = flat.apply({"params": unstack(params, m.num_layers)}, ids)
  np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "save_qkv_proj", "save_out_proj"])
def test_remat_policies_same_values_and_grads(setup, policy):
  m, model, params, ids = setup
  remat = llada.build_model(tiny(remat_policy=policy))

  def loss(p, mdl):
    return jnp.mean(jax.nn.log_softmax(mdl.apply({"params": p}, ids))[..., 0])

  l0, g0 = jax.value_and_grad(loss)(params, model)
  l1, g1 = jax.value_and_grad(loss)(params, remat)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_fully_padded_rows_are_finite(setup):
  m, model, params, ids = setup
  mask = np.ones(ids.shape, bool)
  mask[1] = False  # a row that is entirely padding
  for dtype in ("float32", "bfloat16"):
    mdl = llada.build_model(tiny(dtype=dtype))
    out = np.asarray(mdl.apply({"params": params}, ids, jnp.asarray(mask)), np.float32)
    assert np.isfinite(out).all(), dtype


def test_bf16_compute_and_params(setup):
  m, model, params, ids = setup
  ref = model.apply({"params": params}, ids)
  bf = llada.build_model(tiny(dtype="bfloat16"))
  out = bf.apply({"params": params}, ids)
  assert out.dtype == jnp.float32  # logits come out in fp32 (fp32 accumulation)
  assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.1 * np.abs(np.asarray(ref)).max()
  p16 = llada.init_params(llada.build_model(tiny(param_dtype="bfloat16")), jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}


def test_hidden_output_and_selected_logits(setup):
  m, model, params, ids = setup
  h = model.apply({"params": params}, ids, output="hidden")
  assert h.shape == (*ids.shape, m.d_model)
  full = model.apply({"params": params}, ids)
  at = jnp.array([[0, 5, 15], [3, 3, 9]])
  sel = model.apply({"params": params}, ids, logits_at=at)
  np.testing.assert_allclose(sel, np.take_along_axis(np.asarray(full), np.asarray(at)[..., None], 1), atol=1e-5)
  with pytest.raises(ValueError, match="output must be"):
    model.apply({"params": params}, ids, output="probs")


def test_every_parameter_has_logical_axis_names():
  for scan in (True, False):
    boxed = partitioning.abstract_variables(llada.build_model(tiny(scan_layers=scan)))["params"]
    specs = partitioning.logical_specs(boxed)
    leaves = jax.tree.leaves(nn.unbox(boxed))
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(leaves) == len(spec_leaves)
    for leaf, spec in zip(leaves, spec_leaves):
      assert len(spec) == leaf.ndim and all(isinstance(n, str) for n in spec), spec
      if scan and leaf.ndim > 1 and spec[0] == "layers":
        assert leaf.shape[0] == 2


def test_mask_shapes_are_checked(setup):
  m, model, params, ids = setup
  with pytest.raises(ValueError, match="attention_mask has shape"):
    model.apply({"params": params}, ids, jnp.ones((2, 15), bool))


def test_library_attention_matches_einsum(setup):
  """model.attention_impl=xla (jax.nn.dot_product_attention) gives our einsum attention's values and gradients, with no
  mask, a padding mask, a boolean pair mask, and grouped-query heads."""
  m, model, params, ids = setup
  rng = np.random.default_rng(0)
  pad = np.ones(ids.shape, bool)
  pad[0, -5:] = False
  pairs = rng.random((ids.shape[0], 1, ids.shape[1], ids.shape[1])) < 0.7
  pairs[..., np.arange(ids.shape[1]), np.arange(ids.shape[1])] = True
  for kv in (m.num_heads, m.num_heads // 2):
    ours, lib = llada.build_model(tiny(num_kv_heads=kv)), llada.build_model(tiny(num_kv_heads=kv, attention_impl="xla"))
    p = llada.init_params(ours, jax.random.key(kv))
    for mask in (None, jnp.asarray(pad), jnp.asarray(pairs)):

      def loss(q, mdl, mask=mask):
        return jnp.mean(jax.nn.log_softmax(mdl.apply({"params": q}, ids, mask))[..., 0])

      l0, g0 = jax.value_and_grad(loss)(p, ours)
      l1, g1 = jax.value_and_grad(loss)(p, lib)
      np.testing.assert_allclose(l0, l1, rtol=1e-5)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g0, g1)


def test_cudnn_attention_needs_low_precision():
  with pytest.raises(config_lib.ConfigError, match="model.attention_impl"):
    config_lib.load_config(TINY, {"model.attention_impl": "cudnn"})
  with pytest.raises(config_lib.ConfigError, match="model.attention_impl"):
    config_lib.load_config(TINY, {"model.attention_impl": "flash"})


@pytest.mark.parametrize("n", [7, 128, 1000, 1024])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_argmax_last_matches_argmax(n, dtype):
  from mmada_jax.models import layers

  x = np.array(jax.random.normal(jax.random.key(n), (3, 5, n), jnp.float32))
  x = np.round(x * 4) / 4  # many ties, inside and across chunks
  x[0, 1] = 1.0  # every entry tied: the first index wins
  x[0, 2] = -np.inf  # all -inf
  x[1, 0, n // 2] = np.nan  # a NaN counts as the maximum, the first NaN wins
  x[1, 0, n - 1] = np.nan
  x[1, 1, n - 1] = np.inf
  x[2, 3, :] = np.finfo(np.float32).min
  x = jnp.asarray(x, dtype)
  clean = x.at[1, 0].set(0.0)  # no NaN anywhere: the chunked path for n = 1024
  for a in (clean, x):
    got = jax.jit(layers.argmax_last)(a)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(a, axis=-1)))
  assert int(got[1, 0]) == n // 2 and int(got[1, 1]) == n - 1


def test_argmax_last_rejects_integers():
  from mmada_jax.models import layers

  with pytest.raises(TypeError, match="floating"):
    layers.argmax_last(jnp.arange(300))
