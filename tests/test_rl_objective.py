"""UniGRPO objective: masked-token log-probs vs a naive full-logits computation, the surrogate / k3 KL / aggregation vs
a NumPy reference, group advantages, and the gradient identities of spec §6.7 (items 1 and 4)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmada_jax import config as config_lib
from mmada_jax.models import llada
from mmada_jax.rl import masks, objective as obj, schedule

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "tiny.py")
SMALL = {"model.num_layers": "1", "model.d_model": "32", "model.num_heads": "2", "model.num_kv_heads": "2",
         "model.mlp_hidden": "64", "model.scan_layers": "false"}
B, P, C, MASK, EOS = 8, 6, 10, 230, 229


@pytest.fixture(scope="module")
def env():
  config = config_lib.load_config(TINY, SMALL)
  model = llada.build_model(config.model)
  params = llada.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 220, (B, P + C)).astype(np.int32)
  for b, end in enumerate([3, 9, 5, 10, 1, 7, 4, 8]):  # EOS tails (row 3: truncated)
    tokens[b, P + end:] = EOS
  attn = np.ones((B, P + C), np.int32)
  attn[1, :2] = attn[5, :3] = 0  # left padding
  maskable, eligible = masks.response_positions(jnp.asarray(tokens[:, P:]), (EOS,))
  ratios = schedule.mask_ratios(jax.random.key(1), jnp.arange(B), 3)[:, None]
  resp, _ = masks.all_masks(jax.random.key(2), ratios, jnp.arange(B), maskable)
  return dict(model=model, params=params, tokens=jnp.asarray(tokens), attn=jnp.asarray(attn), resp=resp[:, 0],
              eligible=eligible)


@functools.partial(jax.jit, static_argnames=("model", "vocab_slice"))
def naive_logp(model, params, tokens, attn, resp, want, vocab_slice=None):
  """Full [B, L, V] logits, log_softmax, gather (the reference the memory-safe path must equal)."""
  noisy = jnp.where(jnp.concatenate([jnp.zeros((B, P), bool), resp], 1), MASK, tokens)
  logits = model.apply({"params": params}, noisy, attn)[:, P:]
  labels = tokens[:, P:]
  if vocab_slice:
    logits, labels = logits[..., vocab_slice[0]:vocab_slice[1]], labels - vocab_slice[0]
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[..., None], -1)[..., 0]
  return jnp.where(want, lp, 0.0)


def test_logp_equals_naive_full_logits(env):
  e = env
  s = obj.LogpSettings(mask_id=MASK, head="gather", head_chunk=4, head_capacity=0.5)
  fn = jax.jit(lambda rm, w: obj.token_logp(e["params"], e["model"], e["tokens"], e["attn"], rm, None, w, s))
  for n in range(3):
    want = e["resp"][n] & e["eligible"]
    got = fn(e["resp"][n], want)
    np.testing.assert_allclose(got, naive_logp(e["model"], e["params"], e["tokens"], e["attn"], e["resp"][n], want),
                               atol=2e-5, rtol=1e-5)
    assert np.all(np.asarray(got)[~np.asarray(want)] == 0) and np.all(np.asarray(got)[np.asarray(want)] < 0)


def test_logp_over_a_vocabulary_slice(env):
  e = env
  tokens = e["tokens"].at[:, P:].set(e["tokens"][:, P:] % 64 + 236)  # image ids 236..299 in the response
  s = obj.LogpSettings(mask_id=MASK, head="chunked", head_chunk=4, vocab_slice=(236, 300))
  want = e["resp"][0] & e["eligible"]
  got = obj.token_logp(e["params"], e["model"], tokens, e["attn"], e["resp"][0], None, want, s)
  ref = naive_logp(e["model"], e["params"], tokens, e["attn"], e["resp"][0], want, (236, 300))
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)


def test_fold_vmap_map_agree_and_precompute_shapes(env):
  e = env
  want = e["resp"] & e["eligible"][None]
  outs = {}
  for mode in obj.LOGP_MODES:
    s = obj.LogpSettings(mask_id=MASK, head="chunked", head_chunk=4, mode=mode)
    outs[mode] = jax.jit(lambda p: obj.multi_mask_logp(p, e["model"], e["tokens"], e["attn"], e["resp"], None, want,
                                                       s))(e["params"])
  assert outs["fold"].shape == (3, B, C)
  for n in range(3):  # the chunked head (3 chunks of 4 positions) against full logits
    np.testing.assert_allclose(outs["fold"][n], naive_logp(e["model"], e["params"], e["tokens"], e["attn"],
                                                           e["resp"][n], want[n]), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(outs["vmap"], outs["fold"], atol=2e-5)
  np.testing.assert_allclose(outs["map"], outs["fold"], atol=2e-5)
  s = obj.LogpSettings(mask_id=MASK, head="chunked", head_chunk=4)
  old, ref = jax.jit(lambda p: obj.precompute_logps(p, None, e["model"], e["tokens"], e["attn"], e["resp"][:, None],
                                                    None, want[:, None], s))(e["params"])
  assert old.shape == (3, 1, B, C) and ref is None
  np.testing.assert_allclose(old[:, 0], outs["fold"], atol=2e-5)


def numpy_loss(logp, old, ref, lm, eligible, adv, w, s):
  """Spec §6.4 written with loops: per token f = min(rA, clip(r)A) − β k3; sample- or token-level aggregation."""
  k, b, c = logp.shape
  num = den = 0.0
  for kk in range(k):
    for i in range(b):
      fs = []
      for t in range(c):
        if not lm[kk, i, t]:
          continue
        delta = logp[kk, i, t] - old[kk, i, t]
        if s.logratio_clamp:
          delta = min(max(delta, -s.logratio_clamp), s.logratio_clamp)
        r = np.exp(delta)
        surr = min(r * adv[i], min(max(r, 1 - s.clip_low), 1 + s.clip_high) * adv[i])
        d = ref[kk, i, t] - logp[kk, i, t]
        fs.append(surr - s.beta * (np.exp(d) - d - 1))
      if s.normalisation == "token":
        num, den = num + w[i] * sum(fs), den + w[i] * len(fs)
      elif fs:
        n_row = len(fs) if s.seq_normaliser == "masked" else eligible[i].sum()
        num, den = num + w[i] * sum(fs) / n_row, den + w[i]
  return -num / den


@pytest.mark.parametrize("norm,seq,clamp", [("sample", "masked", 0.0), ("token", "masked", 0.0),
                                            ("sample", "response", 0.5)])
def test_surrogate_kl_aggregation_vs_numpy(norm, seq, clamp):
  rng = np.random.default_rng(1)
  k, b, c = 2, 6, 7
  logp = -rng.uniform(0.1, 3, (k, b, c))
  old = logp + rng.normal(0, 0.3, (k, b, c))
  ref = logp + rng.normal(0, 0.3, (k, b, c))
  eligible = np.arange(c)[None] < rng.integers(2, c + 1, b)[:, None]
  lm = (rng.random((k, b, c)) < 0.6) & eligible[None]
  lm[:, 0] = False  # a row without loss positions gets weight 0
  adv, w = rng.normal(size=b), np.array([1, 1, 0, 1, 1, 1.0])
  s = obj.LossSettings(clip_low=0.2, clip_high=0.28, beta=0.04, normalisation=norm, seq_normaliser=seq,
                       logratio_clamp=clamp)

  @jax.jit
  def loss_and_terms(logp, old, ref, adv, lm, eligible, w):
    terms = obj.token_terms(logp, old, ref, adv, s)
    num = obj.loss_numerator(terms["f"], lm, eligible[None], w, s)
    return -num / obj.loss_denominator(lm, w, s), terms, obj.metric_sums(terms, lm, w)

  got, terms, sums = loss_and_terms(logp, old, ref, adv, lm, eligible, w)
  np.testing.assert_allclose(float(got), numpy_loss(logp, old, ref, lm, eligible, adv, w, s), rtol=1e-5)
  k3 = np.asarray(terms["k3"])
  assert np.all(k3 >= -1e-7)
  m = lm & (w[None, :, None] > 0)
  assert float(sums["tokens"]) == m.sum()
  r = np.exp(np.clip(logp - old, -clamp, clamp) if clamp else logp - old)
  clipped = ((r < 0.8) & (adv[None, :, None] < 0)) | ((r > 1.28) & (adv[None, :, None] > 0))
  np.testing.assert_allclose(float(sums["clip_low"] + sums["clip_high"]), (clipped & m).sum())


def test_group_advantages():
  rewards = np.array([2.5, 0.5, 0.0, 2.5, 1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 0.5, 2.5])
  out = obj.group_advantages(rewards, 4)
  g = rewards.reshape(3, 4)
  want = (g - g.mean(1, keepdims=True)) / np.where(g.std(1) > 0, g.std(1), 1)[:, None]
  want[1] = 0.0
  np.testing.assert_allclose(out["adv"], want.reshape(-1), rtol=1e-6)
  np.testing.assert_array_equal(out["zero_std"], [False, True, False])
  np.testing.assert_array_equal(out["row_weight"], 1.0)
  filtered = obj.group_advantages(rewards, 4, filter_zero_std=True)
  np.testing.assert_array_equal(filtered["row_weight"], [1] * 4 + [0] * 4 + [1] * 4)
  mean_only = obj.group_advantages(rewards, 4, std=False)
  np.testing.assert_allclose(mean_only["adv"], (g - g.mean(1, keepdims=True)).reshape(-1), rtol=1e-6)
  with pytest.raises(ValueError, match="multiple of rl.group_size=5"):
    obj.group_advantages(rewards, 5)


def test_gradient_at_theta_old_is_the_policy_gradient(env):
  """θ = θ_old = θ_ref: ∇loss = −Σ_b w_b A_b ∇s_b / Σ_b w_b (s_b the masked mean log-prob); equal rewards → ∇ = 0."""
  e = env
  s_logp = obj.LogpSettings(mask_id=MASK, head="chunked", head_chunk=4)
  s_loss = obj.LossSettings(beta=0.04)
  lm = (e["resp"][1] & e["eligible"])[None]
  old = jax.jit(lambda p: obj.multi_mask_logp(p, e["model"], e["tokens"], e["attn"], e["resp"][1:2], None, lm,
                                              s_logp))(e["params"])
  w = jnp.ones((B,))

  def loss(p, adv):
    logp = obj.multi_mask_logp(p, e["model"], e["tokens"], e["attn"], e["resp"][1:2], None, lm, s_logp)
    terms = obj.token_terms(logp, old, old, adv, s_loss)
    return -obj.loss_numerator(terms["f"], lm, e["eligible"][None], w, s_loss) / obj.loss_denominator(lm, w, s_loss)

  def pg(p, adv):
    logp = obj.multi_mask_logp(p, e["model"], e["tokens"], e["attn"], e["resp"][1:2], None, lm, s_logp)
    return -jnp.sum(adv * obj.sequence_logp(logp, lm)[0]) / jnp.sum(jnp.sum(lm[0], -1) > 0)

  adv = jnp.asarray(np.random.default_rng(3).normal(size=B), jnp.float32)
  g1, g2 = jax.jit(jax.grad(loss))(e["params"], adv), jax.jit(jax.grad(pg))(e["params"], adv)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g1, g2)
  # Equal rewards: A = 0, so only the KL term is left, whose gradient vanishes at θ = θ_ref (up to the fp32 round-off
  # between the precompute's forward program and the gradient's).
  zero = jax.jit(jax.grad(loss))(e["params"], jnp.asarray(obj.group_advantages(np.ones(B), 4)["adv"]))
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g1))
  assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(zero)) < 1e-5 * scale
