"""Every sharding preset computes the same thing: on the 8 fake CPU devices the masked-denoising train step (the full
MMaDA objective) and the UniGRPO policy step give the loss and gradients of the single-device run (fp32 tolerance),
with the parameters coming out sharded exactly as the preset's golden dump says (tests/golden/shardings_<preset>.json).

The optimiser is SGD with learning rate 1, so that `params_before - params_after` is the gradient itself.
(tests/test_sharding.py checks sharded forward passes; tests/test_rl_step.py the RL step's micro-batching.)
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmada_jax import config as config_lib
from mmada_jax.diffusion.losses import Objective
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib
from mmada_jax.rl import masks, objective as obj, schedule, step as rl_step
from mmada_jax.train import loop, state as state_lib, step as step_lib
from test_golden_shardings import WIDE
from test_multihost import global_batch

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "experiments" / "tiny.py")
PRESETS = sorted(rules_lib.PRESETS)
SGD = optax.sgd(1.0)
B, P, C, MU, K, EOS = 16, 6, 10, 2, 2, 229
MODEL = {**WIDE, "model.num_layers": "1"}  # one (scanned) layer: the same parameter names, less to compile


def rl_host_batch() -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 220, (B, P + C)).astype(np.int32)
  for b, end in enumerate(rng.integers(1, C, B)):
    tokens[b, P + end:] = EOS
  attn = np.ones((B, P + C), np.int32)
  attn[1, :2] = attn[5, :3] = 0
  maskable, eligible = masks.response_positions(jnp.asarray(tokens[:, P:]), (EOS,))
  uid = np.arange(B, dtype=np.int32)
  return dict(tokens=tokens, attn=attn, maskable=np.asarray(maskable), eligible=np.asarray(eligible),
              adv=rng.normal(size=B).astype(np.float32), row_weight=np.ones(B, np.float32), uid=uid,
              ratios=np.asarray(schedule.multi_mask_ratios(jax.random.key(1), jnp.asarray(uid), MU, K)),
              mask_key=np.asarray(jax.random.key_data(jax.random.key(7))))


RL_SETTINGS = rl_step.StepSettings(logp=obj.LogpSettings(mask_id=230, head="gather", head_chunk=128),
                                   loss=obj.LossSettings(beta=0.04), prompt_mask_prob=0.2)


@pytest.fixture(scope="module")
def reference():
  """Single-device results: initial params, train-step and RL-step (metrics, gradients), the RL batch."""
  config = config_lib.load_config(TINY, MODEL)
  model = llada.build_model(config.model)
  params = llada.init_params(model, jax.random.key(0))
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=SGD.init(params))
  hooks = Objective(config, model)
  batch = jax.tree.map(jnp.asarray, global_batch(0))
  new, train_metrics = jax.jit(step_lib.make_train_step(hooks, SGD, hooks.coefficients, 1, seed=5))(state, batch)
  grad = lambda s: jax.tree.map(np.subtract, jax.device_get(params), jax.device_get(s.params))
  rl = rl_host_batch()
  old = jax.jit(rl_step.make_precompute(model, RL_SETTINGS))(params, params, rl)
  rl.update({k: np.asarray(v) for k, v in old.items()})
  new_rl, rl_metrics = jax.jit(rl_step.make_policy_step(model, SGD, RL_SETTINGS))(state, rl, jnp.int32(1))
  return dict(config=config, model=model, params=jax.device_get(params), hooks=hooks, rl=rl,
              old=jax.device_get(old), train=(jax.device_get(train_metrics), grad(new)),
              policy=(jax.device_get(rl_metrics), grad(new_rl)))


def sharded_env(ref, preset):
  config = config_lib.load_config(TINY, {"sharding.preset": preset, **MODEL})
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules(preset)
  _, shardings = state_lib.state_shardings(ref["model"], SGD, mesh, rules)
  place = lambda: jax.jit(lambda p: state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                         opt_state=SGD.init(p)), out_shardings=shardings)(
      jax.tree.map(jax.device_put, ref["params"], shardings.params))
  return mesh, rules, shardings, place


def check_params_as_golden(params, preset):
  """The output parameters carry the golden mesh specs, and no device holds more than its share."""
  golden = json.loads((ROOT / "tests" / "golden" / f"shardings_{preset}.json").read_text())
  mesh_shape = golden["mesh"]
  split = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    want = golden["params"]["/".join(k.key for k in path)]["mesh"]
    got = list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))
    got = [list(p) if isinstance(p, tuple) else p for p in got]
    assert got == want, (preset, jax.tree_util.keystr(path), got, want)
    factors = [int(np.prod([mesh_shape[a] for a in ([w] if isinstance(w, str) else w or [])])) for w in want]
    assert x.addressable_shards[0].data.shape == tuple(d // f for d, f in zip(x.shape, factors))
    split += any(f > 1 for f in factors)
  assert (split == 0) if preset == "dp" else (split >= 9), (preset, split)


def compare(metrics, grads, want_metrics, want_grads, keys):
  for key in keys:
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=2e-5, atol=1e-7, err_msg=key)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    w = want_grads
    for k in path:
      w = w[k.key]
    scale = float(np.max(np.abs(w))) or 1.0
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("preset", PRESETS)
def test_train_step_equals_single_device(reference, preset):
  ref = reference
  mesh, rules, shardings, place = sharded_env(ref, preset)
  batch = loop.place_batch(global_batch(0), mesh, rules)
  with partitioning.axis_rules(mesh, rules):
    step_fn = step_lib.make_train_step(ref["hooks"], SGD, ref["hooks"].coefficients, 1, seed=5,
                                       param_shardings=shardings.params)  # as train/loop.py builds it
    fn = jax.jit(step_fn, out_shardings=(shardings, None), donate_argnums=0)
    new, metrics = fn(place(), batch)
  check_params_as_golden(new.params, preset)
  grads = jax.tree.map(np.subtract, ref["params"], jax.device_get(new.params))
  want_metrics, want_grads = ref["train"]
  compare(jax.device_get(metrics), grads, want_metrics, want_grads,
          ("loss", "grad_norm", "loss_t2i", "loss_lm", "loss_mmu", "masked_tokens_t2i", "masked_tokens_mmu"))


@pytest.mark.parametrize("preset", PRESETS)
def test_policy_step_equals_single_device(reference, preset):
  ref = reference
  mesh, rules, shardings, place = sharded_env(ref, preset)
  host = {k: v for k, v in ref["rl"].items() if k not in ("old", "ref")}
  sh = rl_step.batch_shardings(host, mesh, rules)
  batch = {k: jax.device_put(v, sh[k]) for k, v in host.items()}
  pre = rl_step.jit_precompute(rl_step.make_precompute(ref["model"], RL_SETTINGS), shardings.params, sh, mesh, rules,
                               True)
  state = place()
  with partitioning.axis_rules(mesh, rules):
    old = pre(state.params, state.params, batch)
  for k in ("old", "ref"):  # the precompute too is sharding-independent (and its rows stay sharded)
    np.testing.assert_allclose(np.asarray(old[k]), ref["old"][k], rtol=1e-5, atol=1e-5, err_msg=k)
    assert old[k].sharding.spec == rl_step.logp_shardings(mesh, rules, True)[k].spec
  batch.update({k: jax.device_put(ref["rl"][k], v) for k, v in rl_step.logp_shardings(mesh, rules, True).items()})
  step_fn = rl_step.make_policy_step(ref["model"], SGD, RL_SETTINGS, param_shardings=shardings.params)
  fn = rl_step.jit_policy_step(step_fn, shardings, {k: v.sharding for k, v in batch.items()}, mesh)
  with partitioning.axis_rules(mesh, rules):
    new, metrics = fn(state, batch, jnp.int32(1))
  check_params_as_golden(new.params, preset)
  grads = jax.tree.map(np.subtract, ref["params"], jax.device_get(new.params))
  want_metrics, want_grads = ref["policy"]
  compare(jax.device_get(metrics), grads, want_metrics, want_grads,
          ("loss", "grad_norm", "ratio_mean", "kl", "loss_tokens", "clip_frac", "mask_ratio"))
