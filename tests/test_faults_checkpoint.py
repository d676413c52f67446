"""Checkpoint faults: a truncated, altered or unreadable latest step is detected at restore and the run falls back to
the newest valid one (warning naming the bad step, which is moved aside, never deleted); a checkpoint written for
another model is refused with the differences listed, before any array is read."""

import os

import jax
import numpy as np
import pytest

from mmada_jax import checkpoint as ckpt, config as config_lib
from mmada_jax.diffusion.losses import Objective
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, rules as rules_lib
from mmada_jax.train import data_setup, loop, optim, state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "experiments", "toyworld.py:text")
SMALL = {"model.num_layers": "1", "model.d_model": "32", "model.num_heads": "2", "model.num_kv_heads": "2",
         "model.mlp_hidden": "64", "data.batch_size_lm": "8", "data.max_text_len": "24", "train.log_every": "1",
         "checkpoint.save_every_steps": "1", "checkpoint.async_save": "true", "checkpoint.keep": "5",
         "train.tensorboard": "false", "train.eval_batches": "0"}


@pytest.fixture(scope="module")
def saved_steps(tmp_path_factory):
  """A directory with checkpoints 1, 2, 3 of a tiny state (distinct parameters each), and the pieces to restore it."""
  config = config_lib.load_config(TOY, SMALL)
  model = llada.build_model(config.model)
  tx = optim.make_optimizer(config.optimizer)
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules(config.sharding.preset)
  abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules)
  state = state_lib.create_state(model, tx, jax.random.key(0), mesh, rules, shardings)
  root = tmp_path_factory.mktemp("ckpts") / "checkpoints"
  c = ckpt.TrainCheckpointer(str(root), config.checkpoint)
  states = {}
  for step in (1, 2, 3):
    state = state.replace(step=state.step + 1, params=jax.tree.map(lambda p: p + 1.0, state.params))
    states[step] = jax.device_get(state)
    c.save(step, state, {"position": step}, loop.config_json(config))
  c.close()
  return config, abstract, str(root), states


def fresh_copy(saved_steps, tmp_path):
  import shutil

  config, abstract, root, states = saved_steps
  target = tmp_path / "checkpoints"
  shutil.copytree(root, target)
  return config, abstract, str(target), states


def largest_file(step_dir):
  files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns if n != ckpt.MANIFEST]
  return max(files, key=os.path.getsize)


def truncate(step_dir):
  path = largest_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def flip_byte(step_dir):  # same size, other content: only the sha256 manifest sees it (Orbax restores it silently)
  path = largest_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0xFF]))


def garbage_metadata_without_manifest(step_dir):  # a step killed before its manifest, then damaged
  os.remove(os.path.join(step_dir, ckpt.MANIFEST))
  with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
    f.write("{not json")


def missing_item(step_dir):
  import shutil

  shutil.rmtree(os.path.join(step_dir, "data"))


@pytest.mark.parametrize("damage", [truncate, flip_byte, garbage_metadata_without_manifest, missing_item],
                         ids=lambda f: f.__name__)
def test_corrupt_latest_falls_back_to_newest_valid(saved_steps, tmp_path, damage):
  config, abstract, root, states = fresh_copy(saved_steps, tmp_path)
  damage(os.path.join(root, "3"))
  c = ckpt.TrainCheckpointer(root, config.checkpoint)
  messages = []
  step, state, data, _ = c.restore_latest(abstract, loop.config_json(config), log=messages.append)
  assert step == 2 and data == {"position": 2}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), states[2])
  assert len(messages) == 1 and "checkpoint step 3 is corrupt" in messages[0], messages
  assert f"moved it aside to {root}.corrupt/3" in messages[0], messages
  assert os.path.isdir(f"{root}.corrupt/3") and sorted(os.listdir(root)) == ["1", "2"]  # nothing valid removed
  assert c.all_steps() == [1, 2]
  c.close()


def test_all_corrupt_is_an_error_not_a_fresh_start(saved_steps, tmp_path):
  config, abstract, root, _ = fresh_copy(saved_steps, tmp_path)
  for step in ("1", "2", "3"):
    truncate(os.path.join(root, step))
  c = ckpt.TrainCheckpointer(root, config.checkpoint)
  with pytest.raises(ckpt.CheckpointError, match=r"no valid checkpoint in .*steps \[1, 2, 3\] are all corrupt"):
    c.restore_latest(abstract, loop.config_json(config), log=lambda m: None)
  assert sorted(os.listdir(f"{root}.corrupt")) == ["1", "2", "3"]


@pytest.mark.parametrize("override,message", [
    ({"model.num_layers": "2"}, "model.num_layers: checkpoint has 1, this config has 2"),
    ({"model.scan_layers": "true"}, "model.scan_layers (layer layout: stacked if true, unstacked if false): "
                                    "checkpoint has False, this config has True"),
    ({"model.vocab_size": "2048"}, "model.vocab_size: checkpoint has 1536, this config has 2048"),
    ({"model.d_model": "64", "model.mlp_hidden": "128"}, "model.d_model: checkpoint has 32, this config has 64"),
])
def test_incompatible_config_is_refused_with_the_differences(saved_steps, tmp_path, override, message):
  config, _, root, _ = fresh_copy(saved_steps, tmp_path)
  other = config_lib.load_config(TOY, {**SMALL, **override})
  model, tx = llada.build_model(other.model), optim.make_optimizer(other.optimizer)
  abstract, _ = state_lib.state_shardings(model, tx, mesh_lib.create_mesh(other.sharding),
                                          rules_lib.resolve_rules(other.sharding.preset))
  c = ckpt.TrainCheckpointer(root, other.checkpoint)
  with pytest.raises(ckpt.CheckpointError, match="was written for another model; refusing") as e:
    c.restore_latest(abstract, loop.config_json(other), log=lambda m: pytest.fail(m))
  assert message in str(e.value)
  assert c.all_steps() == [1, 2, 3] and not os.path.exists(f"{root}.corrupt")  # refused, not treated as corrupt


def test_training_resumes_from_the_fallback_and_rewrites_the_bad_step(tmp_path):
  """Loop level: corrupt the last of 3 steps, rerun: resumes at 2, writes step 3 again, same parameters as before."""
  make = lambda: loop.setup(config_lib.load_config(TOY, {**SMALL, "train.steps": "3"}), str(tmp_path / "w"),
                            Objective, data_setup.make_data, log=messages.append)
  messages = []
  run = make()
  loop.train(run, log=lambda s: None, progress=False)
  first = jax.device_get(run.state)
  truncate(str(tmp_path / "w" / "checkpoints" / "3"))
  messages.clear()
  again = make()
  assert int(again.state.step) == 2
  assert any("checkpoint step 3 is corrupt" in m for m in messages), messages
  loop.train(again, log=lambda s: None, progress=False)
  jax.tree.map(np.testing.assert_array_equal, first, jax.device_get(again.state))
  assert os.path.exists(tmp_path / "w" / "checkpoints" / "3" / ckpt.MANIFEST)
  assert os.path.isdir(tmp_path / "w" / "checkpoints.corrupt" / "3")
