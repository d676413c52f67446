"""Numerical faults: a step with a non-finite loss or gradient leaves parameters and optimiser state bit-identical
(train step and UniGRPO policy step), is counted, and `train.max_nonfinite_steps` consecutive ones stop the run with a
message naming the steps; loss spikes are logged and counted.

Faults are injected through a per-row `scale` column that multiplies the loss numerator (NaN poisons the step, a large
value makes a spike)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmada_jax import config as config_lib
from mmada_jax.diffusion.losses import Objective
from mmada_jax.models import llada
from mmada_jax.train import data_setup, faults, loop, optim, state as state_lib, step as step_lib
from test_rl_step import compiled, env, fresh, settings  # noqa: F401  (env is a fixture)
from test_train_loop import SMALL as LOOP_SMALL, TOY
from test_train_step import TINY, TextHooks

SMALL = {**LOOP_SMALL, "checkpoint.save_every_steps": "100", "train.eval_batches": "0"}


class Scaled:
  """Wraps loss hooks: the lm numerator of a (micro-)batch is multiplied by the largest `scale` of its rows."""

  def __init__(self, inner):
    self.inner, self.coefficients = inner, inner.coefficients

  def corrupt(self, batch, key):
    scale = batch["lm"]["scale"]
    out = self.inner.corrupt({t: {k: v for k, v in a.items() if k != "scale"} for t, a in batch.items()}, key)
    out["lm"] = dict(out["lm"], scale=scale)
    return out

  def denominators(self, corrupted):
    return self.inner.denominators(corrupted)

  def numerators(self, params, corrupted):
    nums, aux = self.inner.numerators(params, corrupted)
    return dict(nums, lm=nums["lm"] * jnp.max(corrupted["lm"]["scale"])), aux


def same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("micro", [1, 2])
def test_nonfinite_train_step_keeps_the_state(micro):
  config = config_lib.load_config(TINY, {"optimizer.warmup_steps": "0", "optimizer.learning_rate": "1e-3"})
  model = llada.build_model(config.model)
  tx = optim.make_optimizer(config.optimizer)
  params = llada.init_params(model, jax.random.key(0))
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  fn = jax.jit(step_lib.make_train_step(Scaled(TextHooks(model)), tx, {"lm": 1.0}, micro, seed=3))
  ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 228)
  batch = lambda s: {"lm": {"input_ids": ids, "scale": jnp.full((8,), s, jnp.float32)}}
  for bad in (jnp.nan, jnp.inf):
    after, m = jax.device_get(fn(state, batch(bad)))
    assert m["finite"] == 0.0 and m["skipped"] == 1.0 and not np.isfinite(m["loss"])
    same(after.params, state.params)
    same(after.opt_state, state.opt_state)  # Adam moments and its update count untouched
    assert int(after.step) == 1  # the data / PRNG position advances (step-counter policy, train/step.py)
  good, m = jax.device_get(fn(state, batch(1.0)))
  assert m["finite"] == 1.0 and m["skipped"] == 0.0
  assert not np.array_equal(good.params["wte"], jax.device_get(state.params["wte"]))


def test_nonfinite_policy_step_keeps_the_state(env):  # noqa: F811
  s = settings(k_micro=2)
  batch, _ = compiled(env, s, 1)
  from mmada_jax.rl import step as rl_step

  fn = rl_step.jit_policy_step(rl_step.make_policy_step(env["model"], env["tx"], s,
                                                        param_shardings=env["shardings"].params),
                               env["shardings"], {k: v.sharding for k, v in batch.items()}, env["mesh"])
  from mmada_jax.parallel import partitioning

  poisoned = dict(batch, adv=jax.device_put(jnp.full(batch["adv"].shape, jnp.nan), batch["adv"].sharding))
  with partitioning.axis_rules(env["mesh"], env["rules"]):
    after, m = jax.device_get(fn(fresh(env), poisoned, jnp.int32(0)))
    good, m_good = jax.device_get(fn(fresh(env), batch, jnp.int32(0)))
  assert m["finite"] == 0.0 and m["skipped"] == 1.0
  same(after.params, jax.device_get(env["state"].params))
  same(after.opt_state, jax.device_get(env["state"].opt_state))
  assert int(after.step) == int(env["state"].step) + 1
  assert m_good["finite"] == 1.0
  assert not np.array_equal(good.params["wte"], jax.device_get(env["state"].params["wte"]))


class ScaledData:
  """The config's data with a `scale` column on lm rows: `plan[step]` (1-based step) for the listed steps, else 1."""

  def __init__(self, config, plan):
    self.inner, self.plan, self.step = data_setup.make_data(config), plan, 0

  def __next__(self):
    batch = next(self.inner)
    self.step += 1
    rows = batch["lm"]["input_ids"].shape[0]
    batch["lm"]["scale"] = np.full((rows,), self.plan.get(self.step, 1.0), np.float32)
    return batch

  def get_state(self):
    return self.inner.get_state()


def test_loop_counts_skips_logs_spikes_and_stops_after_consecutive_nonfinite(tmp_path):
  plan = {2: np.nan, 5: 1000.0, 6: np.nan, 7: np.inf}
  config = config_lib.load_config(TOY, {**SMALL, "train.steps": "9", "train.max_nonfinite_steps": "2",
                                        "train.loss_spike_window": "3", "train.loss_spike_factor": "3"})
  run = loop.setup(config, str(tmp_path), lambda c, m: Scaled(Objective(c, m)), lambda c: ScaledData(c, plan),
                   log=lambda s: None)
  messages = []
  with pytest.raises(faults.NonFiniteError) as e:
    loop.train(run, log=messages.append, progress=False)
  assert "2 consecutive steps (6..7) had a non-finite loss or gradient" in str(e.value)
  assert "train.max_nonfinite_steps=2" in str(e.value)
  rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl"))}
  assert sorted(rows) == [1, 2, 3, 4, 5, 6]  # step 7's row was not written: the run stopped there
  assert [rows[s]["skipped"] for s in range(1, 7)] == [0, 1, 0, 0, 0, 1]
  assert [rows[s]["nonfinite_steps"] for s in range(1, 7)] == [0, 1, 1, 1, 1, 2]
  lr = optim.learning_rate_schedule(config.optimizer)  # the logged rate is the update's: a skip does not advance it
  np.testing.assert_allclose([rows[s]["learning_rate"] for s in range(1, 7)], [lr(n) for n in (0, 1, 1, 2, 3, 4)],
                             rtol=1e-6)
  assert [rows[s]["loss_spike"] for s in range(1, 7)] == [0, 0, 0, 0, 1, 0] and rows[6]["loss_spikes"] == 1
  assert any("step 2: non-finite loss or gradient" in m and "update skipped" in m for m in messages), messages
  assert any("step 5: loss spike" in m for m in messages), messages


def test_guard_state_round_trips_and_spikes_need_history():
  g = faults.NumericsGuard(max_consecutive=3, spike_factor=2.0, window=3)
  log = []
  for step, loss in enumerate([1.0, 1.1, 0.9, float("nan"), 5.0], start=1):
    g.update(step, loss, np.isfinite(loss), log.append)
  assert g.spikes == 1 and g.total == 1 and g.consecutive == 0  # 5.0 > 2 x median(1.0, 1.1, 0.9)
  h = faults.NumericsGuard(3, 2.0, 3)
  h.set_state(json.loads(json.dumps(g.get_state())))
  assert h.get_state() == g.get_state()
  early = faults.NumericsGuard(3, 2.0, 100)
  assert early.update(1, 1.0, True, log.append)["loss_spike"] == 0  # nothing to compare with yet
  assert early.update(2, 100.0, True, log.append)["loss_spike"] == 0


def test_rl_guard_counts_non_finite_steps_but_no_spikes():
  train = config_lib.load_config(TINY, {"train.loss_spike_factor": "3", "train.max_nonfinite_steps": "2"}).train
  g = faults.NumericsGuard.from_config(train, what="rl")
  log = []
  for step, loss in enumerate([1e-8, -2e-8, 1e-8] * 4 + [0.02], start=1):  # a surrogate near 0, then a large one
    g.update(step, loss, True, log.append)
  assert g.spikes == 0 and not log
  g.update(14, float("nan"), False, log.append)
  with pytest.raises(faults.NonFiniteError, match="rl: 2 consecutive steps"):
    g.update(15, float("nan"), False, log.append)
  assert faults.NumericsGuard.from_config(train).spike_factor == 3
