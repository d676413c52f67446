"""UniGRPO mask-ratio schedules and masks: Algorithm 1 values, exact counts, prompt never masked, layout independent."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmada_jax.rl import masks, schedule


def alg1_reference(r: float, mu: int, T: int) -> list[float]:
  """Algorithm 1 written out with Python floats: t_1 = ⌊rT⌋, t_n = ⌊(n−1)/(μ−1)·(T − t_1) + t_1⌋, p_n = t_n/T."""
  t1 = math.floor(r * T)
  ts = [t1] + [math.floor((n - 1) / (mu - 1) * (T - t1) + t1) for n in range(2, mu + 1)]
  return [t / T for t in ts]


def test_algorithm1_values_match_the_formula():
  rs = np.array([0.0, 0.1, 0.37, 0.5, 0.8125, 0.999], np.float32)
  for mu in (2, 3, 4, 5, 8):
    got = np.asarray(schedule.algorithm1(jnp.asarray(rs), mu, 1000))
    for j, r in enumerate(rs):
      np.testing.assert_allclose(got[:, j], alg1_reference(float(r), mu, 1000), atol=1e-6)
  # The paper's §5.2 example starts at 100 with 5 iterations; the formula (not the text) gives 325, 550, 775, 1000.
  np.testing.assert_allclose(np.asarray(schedule.algorithm1(jnp.float32(0.1), 5, 1000)),
                             [0.1, 0.325, 0.55, 0.775, 1.0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(schedule.algorithm1(jnp.float32(0.42), 1, 1000)), [0.42], atol=1e-6)


def test_mask_ratios_per_response_properties():
  key, uid = jax.random.key(3), jnp.arange(64) + 1000
  p = np.asarray(schedule.mask_ratios(key, uid, 4, T=1000))
  assert p.shape == (4, 64) and p.dtype == np.float32
  r = np.asarray(jax.vmap(lambda u: jax.random.uniform(jax.random.fold_in(key, u), (1,))[0])(uid))
  np.testing.assert_allclose(p[0], np.floor(r * 1000) / 1000, atol=1e-6)  # p_1 = ⌊rT⌋/T from the row's own key
  np.testing.assert_array_equal(p[-1], 1.0)  # p_μ = 1
  assert np.all(np.diff(p, axis=0) >= 0)  # monotone non-decreasing
  assert len(np.unique(p[0])) > 32  # one independent start per response
  shared = np.asarray(schedule.mask_ratios(key, uid, 4, shared=True))
  assert np.all(shared == shared[:, :1])
  # Layout independence: a row's ratios depend on its uid only.
  perm = np.random.default_rng(0).permutation(64)
  np.testing.assert_array_equal(np.asarray(schedule.mask_ratios(key, uid[perm], 4)), p[:, perm])


def test_other_schedule_modes():
  key, uid = jax.random.key(0), jnp.arange(16)
  wrap = np.asarray(schedule.mask_ratios(key, uid, 4, mode="stratified_wrap"))
  np.testing.assert_allclose(wrap, np.mod(wrap[:1] + np.arange(4)[:, None] / 4, 1.0), atol=1e-6)
  rng = np.asarray(schedule.mask_ratios(key, uid, 5, mode="range", ratio_range=(0.1, 0.9)))
  assert rng.min() >= 0.1 and rng.max() <= 0.9
  iid = np.asarray(schedule.mask_ratios(key, uid, 5, mode="iid", T=100))
  np.testing.assert_allclose(iid * 100, np.round(iid * 100), atol=1e-4)  # quantised to T
  np.testing.assert_array_equal(np.asarray(schedule.mask_ratios(key, uid, 3, mode="d1")), 1.0)
  assert np.asarray(schedule.mask_ratios(key, uid, 3, p_min=0.3)).min() >= 0.3
  multi = np.asarray(schedule.multi_mask_ratios(key, uid, 3, 2))
  assert multi.shape == (3, 2, 16) and not np.array_equal(multi[:, 0], multi[:, 1])
  np.testing.assert_array_equal(np.asarray(schedule.multi_mask_ratios(key, uid, 3, 1))[:, 0],
                                np.asarray(schedule.mask_ratios(key, uid, 3)))
  with pytest.raises(ValueError, match="rl.schedule must be one of"):
    schedule.mask_ratios(key, uid, 3, mode="cosine")


B, C, P = 8, 16, 6  # one shape for every mask test (each new shape is a new compilation)


def test_exact_count_masks():
  maskable = np.ones((B, C), bool)
  maskable[1, 12:] = False  # 12 eligible positions
  maskable[2, :] = False  # nothing eligible
  ratios = jnp.array([[0.0, 0.5, 0.5, 1.0, 0.33, 0.97, 0.01, 0.6]], jnp.float32)
  resp, prompt = masks.iteration_masks(jax.random.key(0), 0, ratios, jnp.arange(B), jnp.asarray(maskable))
  resp = np.asarray(resp)[0]
  assert prompt is None
  n_valid = maskable.sum(-1)
  want = [min(max(round(p * n), 1), n) if n else 0 for p, n in zip(np.asarray(ratios[0]), n_valid)]
  np.testing.assert_array_equal(resp.sum(-1), want)  # p = 0 still masks one token
  assert not np.any(resp & ~maskable)


def test_prompt_never_masked_and_d1_prompt_masking():
  mask_id = 999
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (B, P + C)), jnp.int32)
  prompt_valid = jnp.asarray(np.arange(P)[None] >= np.array([0, 2, 3, 5, 0, 1, 0, 4])[:, None])
  ratios = schedule.mask_ratios(jax.random.key(1), jnp.arange(B), 3)[:, None]
  resp, prompt = masks.all_masks(jax.random.key(1), ratios, jnp.arange(B), jnp.ones((B, C), bool), prompt_valid)
  noisy = np.asarray(masks.noisy_tokens(tokens, resp, prompt, mask_id))
  assert noisy.shape == (3, 1, B, P + C) and prompt is None
  np.testing.assert_array_equal(noisy[..., :P], np.broadcast_to(np.asarray(tokens)[:, :P], (3, 1, B, P)))
  assert np.all(noisy[-1, :, :, P:] == mask_id)  # p_μ = 1: the whole response
  # d1: prompt tokens masked at real positions only, never at padding.
  resp, prompt = masks.all_masks(jax.random.key(1), jnp.ones((3, 1, B)), jnp.arange(B), jnp.ones((B, C), bool),
                                 prompt_valid, prompt_mask_prob=0.5)
  prompt = np.asarray(prompt)
  assert prompt.shape == (3, 1, B, P) and prompt.any() and not np.any(prompt & ~np.asarray(prompt_valid))
  assert np.all(np.asarray(resp))


def test_masks_depend_on_uid_not_on_layout():
  uid = jnp.arange(B) + 40
  ratios = schedule.mask_ratios(jax.random.key(5), uid, 3)[:, None]
  full, _ = masks.all_masks(jax.random.key(9), ratios, uid, jnp.ones((B, C), bool))
  perm = np.array([3, 1, 7, 0, 5, 2, 6, 4])
  permuted, _ = masks.all_masks(jax.random.key(9), ratios[..., perm], uid[perm], jnp.ones((B, C), bool))
  np.testing.assert_array_equal(np.asarray(permuted), np.asarray(full)[..., perm, :])
  # A micro-batch (rows 4..7 alone, padded with other rows to the same shape) gets the same masks.
  other = jnp.concatenate([uid[4:], uid[:4] + 100])
  ratios_other = jnp.concatenate([ratios[..., 4:], ratios[..., :4]], axis=-1)
  split, _ = masks.all_masks(jax.random.key(9), ratios_other, other, jnp.ones((B, C), bool))
  np.testing.assert_array_equal(np.asarray(split)[..., :4, :], np.asarray(full)[..., 4:, :])
  assert not np.array_equal(np.asarray(full)[0], np.asarray(full)[1])  # a new mask every iteration


def test_iteration_index_is_traced():
  fn = jax.jit(lambda n, r: masks.iteration_masks(jax.random.key(0), n, r, jnp.arange(B), jnp.ones((B, C), bool))[0])
  r = jnp.full((1, B), 0.5)
  outs = [np.asarray(fn(jnp.int32(n), r)) for n in range(3)]
  assert fn._cache_size() == 1
  ratios = jnp.broadcast_to(r, (3, 1, B))
  every, _ = masks.all_masks(jax.random.key(0), ratios, jnp.arange(B), jnp.ones((B, C), bool))
  np.testing.assert_array_equal(np.stack(outs), np.asarray(every))  # iteration n of the precompute = step n


def test_bernoulli_rate_and_response_positions():
  resp, _ = masks.iteration_masks(jax.random.key(2), 0, jnp.full((1, 64), 0.3), jnp.arange(64),
                                  jnp.ones((64, 100), bool), law="bernoulli")
  assert abs(float(np.asarray(resp).mean()) - 0.3) < 0.02
  eos, eot = 7, 8
  response = jnp.array([[1, 2, eos, eos, eos], [1, eot, 3, eos, eos], [1, 2, 3, 4, 5]])
  maskable, eligible = masks.response_positions(response, (eos, eot))
  np.testing.assert_array_equal(np.asarray(eligible), [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
  assert np.all(np.asarray(maskable))
  maskable, eligible = masks.response_positions(response, (eos, eot), loss_tail="all", mask_tail=False)
  np.testing.assert_array_equal(np.asarray(maskable), [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
  assert np.all(np.asarray(eligible))
