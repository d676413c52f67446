"""The train step machinery: gradient accumulation equals the full batch, determinism, sharded state creation.

Uses a minimal LLaDA text objective written here (masks from fold_in(key, example_id), Σ CE/p ÷ (B·L)), so that the
step's accumulation and division logic is tested independently of the full MMaDA objective.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmada_jax import config as config_lib
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib
from mmada_jax.train import optim, state as state_lib, step as step_lib

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "tiny.py")
MASK = 230


class TextHooks:
  coefficients = {"lm": 1.0}

  def __init__(self, model):
    self.model = model

  def corrupt(self, batch, key):
    lm = batch["lm"]

    def one(ids, eid):
      k1, k2 = jax.random.split(jax.random.fold_in(key, eid))
      p = (1 - 1e-3) * jax.random.uniform(k1) + 1e-3
      m = jax.random.uniform(k2, ids.shape) < p
      return jnp.where(m, MASK, ids), m, jnp.full(ids.shape, p)

    noisy, m, p = jax.vmap(one)(lm["input_ids"], lm["example_id"])
    return {"lm": {"noisy": noisy, "target": lm["input_ids"], "mask": m, "p": p}}

  def denominators(self, c):
    return {"lm": jnp.float32(c["lm"]["noisy"].size)}

  def numerators(self, params, c):
    lm = c["lm"]
    logits = self.model.apply({"params": params}, lm["noisy"])
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), lm["target"][..., None], -1)[..., 0]
    return {"lm": jnp.sum(jnp.where(lm["mask"], ce / lm["p"], 0.0))}, {"masked_lm": jnp.sum(lm["mask"])}


@pytest.fixture(scope="module")
def env():
  config = config_lib.load_config(TINY, {"optimizer.warmup_steps": "0", "optimizer.learning_rate": "1e-3"})
  model = llada.build_model(config.model)
  tx = optim.make_optimizer(config.optimizer)
  params = llada.init_params(model, jax.random.key(0))
  batch = {"lm": {"input_ids": jax.random.randint(jax.random.key(1), (8, 16), 0, 228)}}
  return config, model, tx, params, batch


def run(env, micro, steps=1, tx=None):
  config, model, default_tx, params, batch = env
  tx = tx or default_tx
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  fn = jax.jit(step_lib.make_train_step(TextHooks(model), tx, TextHooks.coefficients, micro, seed=3))
  out = []
  for _ in range(steps):
    state, metrics = fn(state, batch)
    out.append(jax.device_get(metrics))
  return state, out


def test_accumulation_equals_full_batch(env):
  sgd = optax.sgd(1.0)  # parameter change = -gradient, so the gradients themselves are compared
  s1, m1 = run(env, 1, tx=sgd)
  s4, m4 = run(env, 4, tx=sgd)
  np.testing.assert_allclose(m1[0]["loss"], m4[0]["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1[0]["grad_norm"], m4[0]["grad_norm"], rtol=1e-4)
  assert m1[0]["masked_lm"] == m4[0]["masked_lm"]  # identical masks whatever the micro-batching
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), s1.params, s4.params)


def test_same_seed_same_metrics_and_loss_decreases(env):
  _, a = run(env, 1, steps=6)
  _, b = run(env, 1, steps=6)
  assert [m["loss"] for m in a] == [m["loss"] for m in b]
  assert a[-1]["loss"] < a[0]["loss"]
  assert all(m["finite"] == 1.0 for m in a)


def test_learning_rate_schedule():
  config = config_lib.load_config(TINY, {"optimizer.warmup_steps": "10", "optimizer.decay_steps": "110",
                                         "optimizer.min_lr_scale": "0.1", "optimizer.learning_rate": "1.0"})
  lr = optim.learning_rate_schedule(config.optimizer)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110), lr(500)], [0, 0.5, 1.0, 0.55, 0.1, 0.1],
                             atol=1e-6)


def test_state_is_created_sharded(env):
  config, model, tx, _, _ = env
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules("fsdp")
  abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules)
  state = state_lib.create_state(model, tx, jax.random.key(0), mesh, rules, shardings)
  mu = state.opt_state[1][0].mu  # adamw moments mirror the params' shardings
  assert mu["wte"].sharding.spec == state.params["wte"].sharding.spec
  assert state.params["wte"].addressable_shards[0].data.shape[1] == config.model.d_model // 8
  assert jax.tree.structure(abstract) == jax.tree.structure(state)


def test_accumulation_with_the_mmada_objective():
  """The full objective (t2i + lm + mmu rows, exact-count image masks, answer-only masks): 4 x 1/4 = 1 x full."""
  from mmada_jax.diffusion.losses import Objective

  config = config_lib.load_config(TINY, {"data.max_text_len": "7"})
  model = llada.build_model(config.model)
  params = llada.init_params(model, jax.random.key(0))
  length, rng = 24, np.random.default_rng(0)
  batch = {}
  for task in ("t2i", "lm", "mmu"):
    ids = rng.integers(0, 228, size=(4, length))
    prompt = np.zeros((4, length), np.int32)
    if task == "t2i":  # text prefix (S + 1 = 8), then <soi>, image ids, <eoi>
      ids[:, 8], ids[:, 9:-1], ids[:, -1] = 232, rng.integers(236, 300, size=(4, length - 10)), 233
      prompt[:, :9] = 1
      prompt[:, -1] = 1
    elif task == "mmu":
      prompt[:, :12] = 1
    batch[task] = {"input_ids": jnp.asarray(ids, jnp.int32), "labels": jnp.asarray(ids, jnp.int32),
                   "valid_mask": jnp.ones((4, length), jnp.int32), "prompt_mask": jnp.asarray(prompt)}
  hooks = Objective(config, model)
  sgd = optax.sgd(1.0)
  out = []
  for micro in (1, 4):
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=sgd.init(params))
    fn = jax.jit(step_lib.make_train_step(hooks, sgd, hooks.coefficients, micro, seed=5))
    out.append(jax.device_get(fn(state, batch)))
  (s1, m1), (s4, m4) = out
  for key in ("loss", "loss_t2i", "loss_lm", "loss_mmu"):
    np.testing.assert_allclose(m1[key], m4[key], rtol=1e-5, err_msg=key)
  for key in ("masked_tokens_t2i", "masked_tokens_lm", "masked_tokens_mmu"):
    assert m1[key] == m4[key] > 0, key
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), s1.params, s4.params)


def test_gradient_accumulators_are_constrained_to_the_parameter_shardings(env):
  """With `param_shardings`, the scan's zero accumulators and every micro-batch gradient carry a sharding constraint
  (one per parameter each), and the step's outputs are unchanged."""
  config, model, tx, _, batch = env
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules("fsdp")
  _, shardings = state_lib.state_shardings(model, tx, mesh, rules)
  state = state_lib.create_state(model, tx, jax.random.key(0), mesh, rules, shardings)
  out = []
  for param_shardings in (None, shardings.params):
    step = step_lib.make_train_step(TextHooks(model), tx, TextHooks.coefficients, 2, seed=3,
                                    param_shardings=param_shardings)
    fn = jax.jit(step, out_shardings=(shardings, None))
    with partitioning.axis_rules(mesh, rules):
      text = fn.lower(state, batch).as_text()
      constraints = text.count("sdy.sharding_constraint") + text.count("@Sharding")  # Shardy or GSPMD form
      out.append((jax.device_get(fn(state, batch)), constraints))
  ((s0, m0), n0), ((s1, m1), n1) = out
  assert n1 - n0 == 2 * len(jax.tree.leaves(state.params))
  assert m0["loss"] == m1["loss"] and m0["grad_norm"] == m1["grad_norm"]
  jax.tree.map(np.testing.assert_array_equal, s0, s1)
