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


# ---- cached decoding (prefill / window modes) ----------------------------------------------------------------------


def _cached_calls(model, ids, pad, width):
  """Jitted (full hidden, full logits), prefill (hidden, logits, cache) and window(params, ids, cache, start)."""
  full = jax.jit(lambda p: (model.apply({"params": p}, ids, pad, output="hidden"),
                            model.apply({"params": p}, ids, pad)))

  @jax.jit
  def prefill(p):
    h, cache = model.apply({"params": p}, ids, pad, output="hidden", return_cache=True)
    logits, cache2 = model.apply({"params": p}, ids, pad, return_cache=True)
    return h, logits, cache, cache2

  @jax.jit
  def window(p, ids, cache, start):
    h = model.apply({"params": p}, ids, pad, output="hidden", kv_cache=cache, window_start=start, window=width)
    return h, model.apply({"params": p}, ids, pad, kv_cache=cache, window_start=start, window=width,
                          return_cache=True)

  return full, prefill, window


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cached_modes_equal_the_full_forward(scan, kv_heads):
  """Prefill returns the full forward's hidden states/logits and every layer's post-RoPE keys/values; a window call on
  the same ids with that cache returns the full forward's hidden states/logits at the window and leaves the cache as
  it was. Scanned and unrolled layers, plain and stacked (`compute_params`) kernels, grouped-query heads."""
  m = tiny(scan_layers=scan, num_kv_heads=kv_heads)
  model = llada.build_model(m)
  params = llada.init_params(model, jax.random.key(kv_heads))
  ids = jax.random.randint(jax.random.key(1), (2, 20), 0, m.vocab_size)
  pad = jnp.asarray(np.stack([np.ones(20), np.r_[np.zeros(3), np.ones(17)]]).astype(bool))
  full, prefill, window = _cached_calls(model, ids, pad, 6)
  for p in (params, llada.compute_params(params, model.args)):
    ref_h, ref_logits = full(p)
    h, logits, (k, v), cache2 = prefill(p)
    np.testing.assert_allclose(h, ref_h, atol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    assert k.shape == v.shape == (m.num_layers, 2, 20, kv_heads, 64 // m.num_heads) and k.dtype == jnp.float32
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), (k, v), cache2)
    np.testing.assert_allclose(k[0], _layer0_keys(params, ids, model.args), atol=1e-5)
    for start in (0, 8, 14):
      wh, (wl, new_cache) = window(p, ids, (k, v), jnp.int32(start))
      assert wh.shape == (2, 6, m.d_model) and wl.shape == (2, 6, m.vocab_size)
      real = np.asarray(pad[:, start:start + 6])  # padded queries see the real keys here (never asked by samplers)
      np.testing.assert_allclose(np.asarray(wh)[real], np.asarray(ref_h[:, start:start + 6])[real], atol=1e-5)
      np.testing.assert_allclose(np.asarray(wl)[real], np.asarray(ref_logits[:, start:start + 6])[real], atol=1e-5)
      for a, b in zip(new_cache, (k, v)):  # the window's fresh keys/values are the cached ones (real tokens)
        np.testing.assert_allclose(np.asarray(a)[:, np.asarray(pad)], np.asarray(b)[:, np.asarray(pad)], atol=1e-5)


def _layer0_keys(params, ids, args):
  """The first layer's keys [batch, length, kv_heads, head_dim] after RoPE, computed by hand (fp32, scanned tree)."""
  from mmada_jax.models import layers

  blocks = jax.tree.map(lambda t: t[0], params["blocks"]) if "blocks" in params else params["blocks_0"]
  x = params["wte"][ids]
  h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + args.norm_eps) * blocks["attn_norm"]["scale"]
  k = jnp.einsum("bld,dhk->blhk", h, blocks["attn"]["k_proj"]["kernel"])
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  sin, cos = layers.rope_tables(positions, args.head_dim, args.rope_theta)
  return layers.apply_rope(k, sin, cos)


def test_window_keeps_stale_keys_outside_itself():
  """New ids inside the window: the window's own keys/values are fresh, the rest come from the cache. With one layer
  that is exactly the full forward on the new ids (the first layer's keys/values depend on the tokens alone); with two
  layers the cached keys/values of the other positions are stale and the result differs from it. The returned cache
  holds the window's fresh keys/values at the window and the old ones elsewhere."""
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 300)
  new = ids.at[:, 4:10].set((ids[:, 4:10] + 7) % 300)
  for layers_, exact in ((1, True), (2, False)):
    model = llada.build_model(tiny(num_layers=layers_, scan_layers=False))
    params = llada.init_params(model, jax.random.key(0))
    apply = lambda x, **kw: model.apply({"params": params}, x, output="hidden", **kw)
    _, cache = apply(ids, return_cache=True)
    h, got = apply(new, kv_cache=cache, window_start=jnp.int32(4), window=6, return_cache=True)
    ref, fresh = apply(new, return_cache=True)
    if exact:
      np.testing.assert_allclose(h, ref[:, 4:10], atol=1e-5)
    else:
      assert np.abs(np.asarray(h) - np.asarray(ref[:, 4:10])).max() > 1e-3
    for g, c, f in zip(got, cache, fresh):
      np.testing.assert_allclose(g[0, :, 4:10], f[0, :, 4:10], atol=1e-5)  # layer 0: tokens alone
      np.testing.assert_array_equal(np.delete(np.asarray(g), np.s_[4:10], 2), np.delete(np.asarray(c), np.s_[4:10], 2))


def test_cached_modes_in_bf16():
  m = tiny(dtype="bfloat16")
  model = llada.build_model(m)
  params = llada.compute_params(llada.init_params(model, jax.random.key(0)), model.args)
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, m.vocab_size)
  full, prefill, window = _cached_calls(model, ids, None, 8)
  ref_h, ref_logits = full(params)
  h, logits, (k, v), _ = prefill(params)
  assert k.dtype == v.dtype == jnp.bfloat16
  scale = float(np.abs(np.asarray(ref_logits)).max())
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=0.02 * scale)
  wh, (wl, _) = window(params, ids, (k, v), jnp.int32(8))
  assert wh.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(wl), np.asarray(ref_logits[:, 8:]), atol=0.02 * scale)


def test_cached_mode_arguments_are_checked(setup):
  m, model, params, ids = setup
  _, cache = model.apply({"params": params}, ids, return_cache=True)
  with pytest.raises(ValueError, match="window_start and a static window"):
    model.apply({"params": params}, ids, kv_cache=cache, window_start=0)
  with pytest.raises(ValueError, match="output='all'"):
    model.apply({"params": params}, ids, kv_cache=cache, window_start=0, window=4, output="all")
  with pytest.raises(ValueError, match="padding mask"):
    model.apply({"params": params}, ids, jnp.ones((2, 1, 16, 16), bool), kv_cache=cache, window_start=0, window=4)


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_cached_modes_reproduce_the_parity_fixture(layout, tmp_path):
  """The official backbone fixture (tests/test_backbone_parity.py) through the prefill and window modes: logits
  without a mask and with its padding mask, at the parity test's tolerance."""
  from conftest import FIXTURES
  from sampling_reference import load_backbone

  model, params, _ = load_backbone(FIXTURES / "parity", "backbone_A", tmp_path, layout)
  io = np.load(FIXTURES / "parity" / "backbone_A_io.npz")
  ids = jnp.asarray(io["input_ids"])
  for mask, want in ((None, io["logits_nomask"]), (jnp.asarray(io["attention_mask"]), io["logits_attention_bias"])):
    logits, cache = model.apply({"params": params}, ids, mask, return_cache=True)
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    window = model.apply({"params": params}, ids, mask, kv_cache=cache, window_start=jnp.int32(8), window=8)
    np.testing.assert_allclose(window, want[:, 8:16], atol=1e-4, rtol=0)  # every window query is a real token
