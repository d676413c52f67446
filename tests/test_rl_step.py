"""The jitted UniGRPO device functions on 8 fake CPU devices: sharded params, ratio 1 and KL 0 when policy = old =
reference at every iteration (masks reproduced exactly), no recompilation across n, donation, K > 1, micro-batching,
sharded = unsharded (spec §6.7 items 1, 2, 7)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmada_jax import config as config_lib
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib
from mmada_jax.rl import masks, objective as obj, schedule, step as step_lib
from mmada_jax.train import optim, state as state_lib

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "tiny.py")
SMALL = {"model.num_layers": "1", "model.d_model": "32", "model.num_heads": "2", "model.num_kv_heads": "2",
         "model.mlp_hidden": "64", "model.scan_layers": "false", "optimizer.warmup_steps": "0",
         "optimizer.learning_rate": "1e-3"}
B, P, C, MU, MASK, EOS = 16, 6, 10, 3, 230, 229
HEAD = os.environ.get("RLHEAD", "gather")


def host_batch(k: int) -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 220, (B, P + C)).astype(np.int32)
  for b, end in enumerate([3, 9, 5, 10, 1, 7, 4, 8] * 2):
    tokens[b, P + end:] = EOS
  attn = np.ones((B, P + C), np.int32)
  attn[1, :2] = attn[5, :3] = 0
  maskable, eligible = masks.response_positions(jnp.asarray(tokens[:, P:]), (EOS,))
  uid = np.arange(B, dtype=np.int32) + 100
  ratios = schedule.multi_mask_ratios(jax.random.key(1), jnp.asarray(uid), MU, k)
  return dict(tokens=tokens, attn=attn, maskable=np.asarray(maskable), eligible=np.asarray(eligible),
              adv=rng.normal(size=B).astype(np.float32), row_weight=np.ones(B, np.float32), uid=uid,
              ratios=np.asarray(ratios), mask_key=np.asarray(jax.random.key_data(jax.random.key(7))))


@pytest.fixture(scope="module")
def env():
  config = config_lib.load_config(TINY, SMALL)
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules(config.sharding.preset)
  model = llada.build_model(config.model)
  tx = optim.make_optimizer(config.optimizer)
  _, shardings = state_lib.state_shardings(model, tx, mesh, rules)
  state = state_lib.create_state(model, tx, jax.random.key(0), mesh, rules, shardings)
  return dict(config=config, mesh=mesh, rules=rules, model=model, tx=tx, shardings=shardings, state=state,
              ref=step_lib.frozen_copy(state.params, shardings.params))


def settings(k_micro: int = 1, prompt_mask_prob: float = 0.0) -> step_lib.StepSettings:
  return step_lib.StepSettings(logp=obj.LogpSettings(mask_id=MASK, head=HEAD, head_chunk=128),
                               loss=obj.LossSettings(beta=0.04), prompt_mask_prob=prompt_mask_prob,
                               micro_batches=k_micro)


def compiled(e, s: step_lib.StepSettings, k: int):
  """(placed batch with old/ref log-probs, jitted step) for K masks per step."""
  hb = host_batch(k)
  sh = step_lib.batch_shardings(hb, e["mesh"], e["rules"])
  batch = {name: jax.device_put(v, sh[name]) for name, v in hb.items()}
  pre = step_lib.jit_precompute(step_lib.make_precompute(e["model"], s), e["shardings"].params, sh, e["mesh"],
                                e["rules"], True)
  with partitioning.axis_rules(e["mesh"], e["rules"]):
    batch.update(pre(e["state"].params, e["ref"], batch))
  full_sh = dict(sh, **step_lib.logp_shardings(e["mesh"], e["rules"], True))
  fn = step_lib.jit_policy_step(step_lib.make_policy_step(e["model"], e["tx"], s), e["shardings"], full_sh, e["mesh"])
  return batch, fn


def fresh(e):
  """A copy of the initial state (the step donates its state argument)."""
  return jax.jit(lambda s: jax.tree.map(lambda x: jnp.array(x, copy=True), s), out_shardings=e["shardings"])(e["state"])


def run(e, fn, batch, n):
  with partitioning.axis_rules(e["mesh"], e["rules"]):
    return fn(fresh(e), batch, jnp.int32(n))


def test_sharded_step_identity_donation_and_no_recompile(env):
  """K = 3 masks per step in 2 micro-batches, d1 prompt masking on: with policy = old = reference the ratio is 1 and
  the KL 0 at every iteration (the step reproduces the precompute's masks), one program serves every n."""
  e = env
  wte = e["state"].params["wte"]
  assert wte.addressable_shards[0].data.shape != wte.shape  # really sharded (fsdp over 8 devices)
  assert e["ref"]["wte"].sharding == wte.sharding  # the reference is sharded like the policy
  batch, fn = compiled(e, settings(k_micro=2, prompt_mask_prob=0.3), 3)
  assert batch["old"].shape == (MU, 3, B, C) and batch["ratios"].shape == (MU, 3, B)
  assert batch["old"].sharding.spec[2] is not None  # rows stay sharded
  np.testing.assert_array_equal(np.asarray(batch["old"]), np.asarray(batch["ref"]))
  for n in range(MU):
    state, m = run(e, fn, batch, n)
    m = jax.device_get(m)
    assert abs(m["ratio_max"] - 1) < 1e-5 and abs(m["ratio_min"] - 1) < 1e-5, m
    assert m["kl"] < 1e-9 and m["clip_frac"] == 0 and m["finite"] == 1 and m["loss_tokens"] > 0
    assert int(m["iteration"]) == n
  assert fn._cache_size() == 1  # n is traced: one program for every iteration
  assert state.params["wte"].sharding == wte.sharding and int(state.step) == 1
  donated = fresh(e)
  with partitioning.axis_rules(e["mesh"], e["rules"]):
    fn(donated, batch, jnp.int32(0))
  assert donated.params["wte"].is_deleted() and not e["ref"]["wte"].is_deleted()
  e["k3"] = (batch, fn)


def test_micro_batches_and_sharding_change_nothing(env):
  """The same step (K = 3, d1 prompt masking) unsharded in one micro-batch equals the sharded 2-micro-batch one."""
  e = env
  s2 = settings(k_micro=2, prompt_mask_prob=0.3)
  batch, fn = e["k3"] if "k3" in e else compiled(e, s2, 3)  # reuse the previous test's program when it ran
  state, m = run(e, fn, batch, 1)
  plain = jax.jit(step_lib.make_policy_step(e["model"], e["tx"], settings(k_micro=1, prompt_mask_prob=0.3)))
  local = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), jax.device_get(e["state"]))
  state_u, m_u = plain(local, {k: np.asarray(v) for k, v in batch.items()}, jnp.int32(1))
  m, m_u = jax.device_get(m), jax.device_get(m_u)
  np.testing.assert_allclose(m["loss"], m_u["loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m["grad_norm"], m_u["grad_norm"], rtol=1e-4)
  assert m["loss_tokens"] == m_u["loss_tokens"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), jax.device_get(state.params),
               jax.device_get(state_u.params))
  prompt = np.asarray(step_lib.masks_of({k: jnp.asarray(v) for k, v in batch.items()}, 1, s2)[1])
  assert prompt.shape == (3, B, P) and prompt.any() and not np.any(prompt & (batch["attn"][:, :P] == 0)[None])


def test_k1_shapes(env):
  """K = 1 (the paper): the same functions, traced only (no compilation) — [μ, 1, B, C] log-probs, scalar metrics."""
  e = env
  s = settings()
  hb = host_batch(1)
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in hb.items()}
  out = jax.eval_shape(step_lib.make_precompute(e["model"], s), e["state"].params, e["ref"], abstract)
  assert out["old"].shape == out["ref"].shape == (MU, 1, B, C)
  abstract.update(out)
  _, metrics = jax.eval_shape(step_lib.make_policy_step(e["model"], e["tx"], s), e["state"], abstract, jnp.int32(0))
  assert all(v.shape == () for v in metrics.values())
  assert {"ratio_mean", "clip_frac", "kl", "mask_ratio"} <= set(metrics)
