"""Preemption: training and UniGRPO runs killed (SIGKILL, during an asynchronous checkpoint write or after a random
delay) or stopped by SIGTERM, then restarted with the same command, end bit-identical to an uninterrupted run:
parameters, optimiser state, data position, loop counters and metrics.

The runs are real `python -m mmada_jax.cli train|rl` subprocesses. Kill points come from a seeded RNG (the seed is in
every assertion message; set MMADA_FAULT_SEED to replay one); `MMADA_FAULT_INJECT` makes a process signal itself at an
exact point (train/faults.py `inject`).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmada_jax import checkpoint as ckpt, config as config_lib
from mmada_jax.diffusion.losses import Objective
from mmada_jax.models import llada
from mmada_jax.parallel import mesh as mesh_lib, rules as rules_lib
from mmada_jax.rl import loop as rl_loop
from mmada_jax.train import data_setup, faults, loop, optim, state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "experiments", "toyworld.py:text")
RL = os.path.join(ROOT, "experiments", "toyworld_rl.py:text")
MODEL = {"model.num_layers": "1", "model.d_model": "32", "model.num_heads": "2", "model.num_kv_heads": "2",
         "model.mlp_hidden": "64", "checkpoint.async_save": "true", "checkpoint.save_every_steps": "1",
         "train.tensorboard": "false"}
TRAIN = {**MODEL, "data.batch_size_lm": "8", "data.max_text_len": "24", "train.log_every": "1",
         "train.eval_batches": "0", "train.steps": "6"}
RL_SMALL = {**MODEL, "rl.prompts_per_step": "2", "rl.group_size": "4", "rl.inner_steps": "2", "rl.rollout_steps": "8",
            "rl.dump_every": "1", "rl.dump_count": "2", "rl.eval_prompts": "0", "optimizer.warmup_steps": "0",
            "optimizer.learning_rate": "1e-3", "rl.steps": "3"}
SEED = int(os.environ.get("MMADA_FAULT_SEED", time.time_ns() % 100000))


def command(kind, config, workdir, overrides):
  return ([sys.executable, "-m", "mmada_jax.cli", kind, "--config", config, "--workdir", str(workdir), "--no_progress"]
          + [f"--config.{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A persistent XLA compilation cache shared by the subprocesses: the first compiles, the restarts load."""
  return str(tmp_path_factory.mktemp("xla_cache"))


def start(cmd, cache, inject=None):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop(faults.INJECT_ENV, None)
  if inject:
    env[faults.INJECT_ENV] = inject
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def rows(workdir, name="metrics.jsonl"):
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return []
  out = []
  for line in open(path):
    try:
      out.append(json.loads(line))
    except ValueError:
      pass  # a line cut by the kill
  return out


def kill_after_random_delay(proc, workdir, after_step, rng):
  """SIGKILL once a metric row past `after_step` exists, after a further random delay; returns the wait used."""
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if any(r.get("step", 0) > after_step for r in rows(workdir)):
      break
    time.sleep(0.02)
  delay = rng.uniform(0.0, 0.4)
  time.sleep(delay)
  if proc.poll() is None:
    proc.send_signal(signal.SIGKILL)
  return delay


def saved(workdir, config):
  """(step, host state, data item) of the newest valid checkpoint of a workdir."""
  model = llada.build_model(config.model)
  tx = optim.make_optimizer(config.optimizer)
  mesh = mesh_lib.create_mesh(config.sharding)
  abstract, _ = state_lib.state_shardings(model, tx, mesh, rules_lib.resolve_rules(config.sharding.preset))
  c = ckpt.TrainCheckpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  step, state, data, _ = c.restore_latest(abstract, loop.config_json(config))
  c.close()
  return step, jax.device_get(state), data


def assert_same_run(ref_dir, dir_, config, what, files=("metrics.jsonl",)):
  (s1, st1, d1), (s2, st2, d2) = saved(ref_dir, config), saved(dir_, config)
  assert s1 == s2, what
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=what), st1, st2)
  assert d1 == d2, what  # data iterator position and loop counters
  drop = lambda r: {k: v for k, v in r.items() if k not in loop.TIMING_METRICS and not k.endswith("_s")}
  for name in files:
    a, b = [drop(r) for r in rows(ref_dir, name)], [drop(r) for r in rows(dir_, name)]
    assert a == b, f"{what}: {name} differs"


def test_train_killed_and_terminated_then_resumed_equals_uninterrupted(tmp_path, cache):
  rng = random.Random(SEED)
  config = config_lib.load_config(TOY, TRAIN)
  ref = loop.setup(config, str(tmp_path / "ref"), Objective, data_setup.make_data, log=lambda s: None)
  loop.train(ref, log=lambda s: None, progress=False)

  work = tmp_path / "run"
  cmd = command("train", TOY, work, TRAIN)
  k = rng.randint(1, 3)  # SIGKILL just after the asynchronous write of checkpoint k was started
  rc, out = finish(start(cmd, cache, inject=f"kill_after_save:{k}"))
  what = f"seed {SEED}: SIGKILL after save {k}"
  assert rc == -signal.SIGKILL, f"{what}: exit {rc}\n{out[-3000:]}"
  assert max(r["step"] for r in rows(work)) >= k, what

  proc = start(cmd, cache)  # resumes; killed again at a random point of a later step
  delay = kill_after_random_delay(proc, work, k, rng)
  rc, out = finish(proc)
  what += f", SIGKILL {delay:.2f}s after step {k + 1}"
  assert rc in (-signal.SIGKILL, 0), f"{what}: exit {rc}\n{out[-3000:]}"

  done = max([0] + [r["step"] for r in rows(work)])
  if done < 5:  # SIGTERM (as a maintenance notice) at the next step: final checkpoint, exit 143, clear message
    rc, out = finish(start(cmd, cache, inject=f"sigterm:{done + 1}"))
    assert rc == faults.PREEMPTED_EXIT_CODE, f"{what}: SIGTERM exit {rc}\n{out[-3000:]}"
    assert f"stopped by SIGTERM after step {done + 1}: checkpoint written to" in out, out[-3000:]
    assert os.path.isdir(work / "checkpoints" / str(done + 1)), what
    assert os.path.exists(work / "checkpoints" / str(done + 1) / ckpt.MANIFEST), what  # the write was waited for

  rc, out = finish(start(cmd, cache))
  assert rc == 0 and "final metrics:" in out, f"{what}: exit {rc}\n{out[-3000:]}"
  assert [r["step"] for r in rows(work)] == [1, 2, 3, 4, 5, 6], what
  assert_same_run(tmp_path / "ref", work, config, what)


def test_rl_terminated_and_killed_during_checkpoint_then_resumed_equals_uninterrupted(tmp_path, cache):
  rng = random.Random(SEED + 1)
  config = config_lib.load_config(RL, RL_SMALL)
  ref = rl_loop.setup(config, str(tmp_path / "ref"), log=lambda s: None)
  rl_loop.train(ref, log=lambda s: None, progress=False)

  work = tmp_path / "run"
  cmd = command("rl", RL, work, RL_SMALL)
  rc, out = finish(start(cmd, cache, inject="sigterm:1"))  # maintenance notice after the first RL step
  assert rc == faults.PREEMPTED_EXIT_CODE, f"SIGTERM exit {rc}\n{out[-3000:]}"
  assert "stopped by SIGTERM after RL step 1: checkpoint written to" in out, out[-3000:]
  assert os.path.exists(work / "checkpoints" / "1" / ckpt.MANIFEST)
  k = rng.randint(2, 3)
  what = f"seed {SEED + 1}: SIGKILL after RL save {k}"
  rc, out = finish(start(cmd, cache, inject=f"kill_after_save:{k}"))  # the write of checkpoint k is in flight
  assert rc == -signal.SIGKILL, f"{what}: exit {rc}\n{out[-3000:]}"
  rc, out = finish(start(cmd, cache))
  assert rc == 0 and "final metrics:" in out, f"{what}: exit {rc}\n{out[-3000:]}"
  assert [r["step"] for r in rows(work)] == [1, 2, 3], what
  assert_same_run(tmp_path / "ref", work, config, what, files=("metrics.jsonl", "samples.jsonl"))
