"""Multi-host for real: two JAX processes on this machine (CPU collectives over gloo, 4 fake CPU devices each, one
coordinator on a free localhost port) train the tiny model for a few steps from per-host slices of the global batch,
save an Orbax checkpoint written by both processes, restore it, and go on training from the restored state. The loss
curve and the final parameters equal a single-process run on 8 devices (fp32 tolerance), and the restored state equals
the saved one bit for bit. Also: the start-up decisions of `parallel.distributed` without starting anything.

Run by hand: `python tests/test_multihost.py worker OUT_DIR` in two shells with MMADA_COORDINATOR=127.0.0.1:PORT,
MMADA_NUM_PROCESSES=2, MMADA_PROCESS_ID=0 / 1, JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script by the two worker processes
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mmada_jax.parallel import distributed  # noqa: E402

TINY = os.path.join(ROOT, "experiments", "tiny.py")
OVERRIDES = {"optimizer.warmup_steps": "0", "optimizer.learning_rate": "3e-3", "checkpoint.async_save": "true",
             "model.num_layers": "1", "model.scan_layers": "false"}
ROWS, LENGTH, STEPS, SAVE_AT = 8, 24, 4, 2


def global_batch(step: int) -> dict:
  """The whole batch of `step` (t2i, lm and mmu rows in the tiny vocabulary's layouts), the same in every process."""
  rng = np.random.default_rng(100 + step)
  batch = {}
  for task in ("t2i", "lm", "mmu"):
    ids = rng.integers(0, 228, size=(ROWS, LENGTH))
    prompt = np.zeros((ROWS, LENGTH), np.int32)
    if task == "t2i":  # text prefix (S + 1 = 8), <soi>, image codes, <eoi>
      ids[:, 8], ids[:, 9:-1], ids[:, -1] = 232, rng.integers(236, 300, size=(ROWS, LENGTH - 10)), 233
      prompt[:, :9] = 1
      prompt[:, -1] = 1
    elif task == "mmu":
      prompt[:, :12] = 1
    ids = ids.astype(np.int32)
    batch[task] = {"input_ids": ids, "labels": ids, "valid_mask": np.ones((ROWS, LENGTH), np.int32),
                   "prompt_mask": prompt}
  return batch


def setup():
  """(config, mesh, rules, abstract state, shardings, fresh state, jitted step) of the tiny model, default preset."""
  from mmada_jax import config as config_lib
  from mmada_jax.diffusion.losses import Objective
  from mmada_jax.models import llada
  from mmada_jax.parallel import mesh as mesh_lib, partitioning, rules as rules_lib
  from mmada_jax.train import optim, state as state_lib, step as step_lib

  config = config_lib.load_config(TINY, OVERRIDES)
  mesh = mesh_lib.create_mesh(config.sharding)
  rules = rules_lib.resolve_rules(config.sharding.preset)
  model = llada.build_model(config.model)
  tx = optim.make_optimizer(config.optimizer)
  abstract, shardings = state_lib.state_shardings(model, tx, mesh, rules)
  state = state_lib.create_state(model, tx, jax.random.key(0), mesh, rules, shardings)
  hooks = Objective(config, model)
  fn = step_lib.make_train_step(hooks, tx, hooks.coefficients, 1, int(config.seed))
  with partitioning.axis_rules(mesh, rules):
    jitted = jax.jit(fn, out_shardings=(shardings, None), donate_argnums=0)
  return config, mesh, rules, abstract, shardings, state, jitted


def train(env, state, steps: range, record: list) -> object:
  """Steps over this process's rows of each global batch, assembled into global arrays by `loop.place_batch`."""
  from mmada_jax.parallel import partitioning
  from mmada_jax.train import loop

  config, mesh, rules, _, _, _, fn = env
  rows = distributed.local_rows(partitioning.batch_sharding(mesh, rules), ROWS)
  for step in steps:
    local = {t: {k: v[rows] for k, v in arrays.items()} for t, arrays in global_batch(step).items()}
    batch = loop.place_batch(local, mesh, rules)
    with partitioning.axis_rules(mesh, rules):
      state, metrics = fn(state, batch)
    record.append({k: float(metrics[k]) for k in ("loss", "grad_norm", "loss_t2i", "loss_lm", "loss_mmu")})
  return state


def worker(out_dir: str) -> None:
  """One of the two processes: train, save (every process writes its shards), restore, compare, train on."""
  from jax.experimental import multihost_utils

  from mmada_jax import checkpoint as ckpt

  distributed.initialize(log=None)
  assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
  env = setup()
  config, mesh, rules, abstract, shardings, state, _ = env
  wte = state.params["wte"]
  assert not wte.is_fully_addressable and wte.addressable_shards[0].data.shape != wte.shape
  record: list = []
  state = train(env, state, range(SAVE_AT), record)
  checkpointer = ckpt.TrainCheckpointer(os.path.join(out_dir, "checkpoints"), config.checkpoint)
  checkpointer.save(SAVE_AT, state, {"next_step": SAVE_AT}, {"name": config.name}, force=True)
  checkpointer.wait()
  restored, data_state, saved_config = checkpointer.restore(SAVE_AT, abstract)
  equal = 0
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.sharding == b.sharding, (a.sharding, b.sharding)
    for sa, sb in zip(a.addressable_shards, b.addressable_shards):
      assert sa.index == sb.index and sa.device == sb.device
      np.testing.assert_array_equal(np.asarray(sa.data), np.asarray(sb.data))
      equal += 1
  del state
  state = train(env, restored, range(SAVE_AT, STEPS), record)
  checkpointer.close()
  params = multihost_utils.process_allgather(state.params, tiled=True)
  facts = {"process": jax.process_index(), "record": record, "data_state": data_state, "config": saved_config,
           "shards_compared": equal, "step": int(state.step.addressable_data(0))}
  with open(os.path.join(out_dir, f"process{jax.process_index()}.json"), "w") as f:
    json.dump(facts, f)
  if jax.process_index() == 0:
    np.savez(os.path.join(out_dir, "params.npz"), **{jax.tree_util.keystr(p): np.asarray(x)
                                                     for p, x in jax.tree_util.tree_leaves_with_path(params)})
  multihost_utils.sync_global_devices("test_multihost done")


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_two(out_dir: str, timeout: float = 150.0) -> list[subprocess.CompletedProcess]:
  """Starts both workers, waits for both (killing both when one fails or time runs out)."""
  port = free_port()
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("MMADA_", "JAX_", "XLA_", "TPU_")) and "proxy" not in k.lower()}
  base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=ROOT,
              MMADA_COORDINATOR=f"127.0.0.1:{port}", MMADA_NUM_PROCESSES="2", MMADA_DISTRIBUTED_TIMEOUT="60")
  procs = []
  for i in range(2):
    log = open(os.path.join(out_dir, f"log{i}.txt"), "w")
    procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", out_dir], cwd=ROOT,
                                   env=dict(base, MMADA_PROCESS_ID=str(i)), stdout=log, stderr=subprocess.STDOUT),
                  log))
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p, _ in procs):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p, _ in procs):
        break
      time.sleep(0.2)
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()
  out = []
  for i, (p, _) in enumerate(procs):
    with open(os.path.join(out_dir, f"log{i}.txt")) as f:
      out.append(subprocess.CompletedProcess(p.args, p.returncode, f.read(), ""))
  return out


def test_two_processes_train_checkpoint_and_match_one_process(tmp_path):
  results = launch_two(str(tmp_path))
  for i, r in enumerate(results):
    assert r.returncode == 0, f"process {i} exited with {r.returncode}:\n{r.stdout[-4000:]}"
  facts = [json.load(open(tmp_path / f"process{i}.json")) for i in range(2)]
  assert [f["process"] for f in facts] == [0, 1]
  assert facts[0]["record"] == facts[1]["record"]  # both processes see the same global metrics
  for f in facts:
    assert f["data_state"] == {"next_step": SAVE_AT} and f["config"] == {"name": "tiny"}
    assert f["shards_compared"] > 0 and f["step"] == STEPS
  saved_dir = tmp_path / "checkpoints" / str(SAVE_AT)
  assert {"state", "data", "config"} <= set(os.listdir(saved_dir))
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(saved_dir / "state"))  # both processes wrote

  # The same steps in this process on 8 devices, from the whole batch.
  env = setup()
  reference: list = []
  state = train(env, env[5], range(STEPS), reference)
  for key in ("loss", "grad_norm", "loss_t2i", "loss_lm", "loss_mmu"):
    np.testing.assert_allclose([r[key] for r in facts[0]["record"]], [r[key] for r in reference], rtol=2e-5,
                               err_msg=key)
  assert len({r["loss"] for r in reference}) == STEPS  # a new batch and new masks each step: not a constant
  saved = np.load(tmp_path / "params.npz")
  for path, x in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)):
    np.testing.assert_allclose(saved[jax.tree_util.keystr(path)], x, atol=2e-6, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------------------------------------------
# Start-up decisions (no processes started)


def test_plan_single_host_by_default():
  p = distributed.plan({}, tpu_vm=False)
  assert p.mode == "single"
  assert distributed.plan({"MMADA_NUM_PROCESSES": "1", "MMADA_COORDINATOR": "h:1", "MMADA_PROCESS_ID": "0"},
                          tpu_vm=False).mode == "single"
  assert distributed.plan({"SLURM_NTASKS": "1"}, tpu_vm=False).mode == "single"


def test_plan_explicit_and_jax_names():
  p = distributed.plan({"MMADA_COORDINATOR": "10.0.0.1:8476", "MMADA_NUM_PROCESSES": "4", "MMADA_PROCESS_ID": "3",
                        "MMADA_LOCAL_DEVICE_IDS": "0,1", "MMADA_DISTRIBUTED_TIMEOUT": "30"}, tpu_vm=True)
  assert (p.mode, p.coordinator, p.num_processes, p.process_id, p.local_device_ids, p.timeout_s) == \
      ("explicit", "10.0.0.1:8476", 4, 3, (0, 1), 30)
  p = distributed.plan({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
  assert (p.mode, p.num_processes, p.process_id) == ("explicit", 2, 1)


def test_plan_auto_detection():
  assert distributed.plan({}, tpu_vm=True).mode == "auto"
  assert distributed.plan({"MMADA_DISTRIBUTED": "0"}, tpu_vm=True).mode == "single"
  assert distributed.plan({"MMADA_DISTRIBUTED": "1"}, tpu_vm=False).mode == "auto"
  assert distributed.plan({"SLURM_NTASKS": "16"}, tpu_vm=False).reason == "SLURM_NTASKS=16"
  assert distributed.plan({"OMPI_COMM_WORLD_SIZE": "2"}, tpu_vm=False).mode == "auto"


@pytest.mark.parametrize("env,match", [
    ({"MMADA_COORDINATOR": "h:1"}, "MMADA_NUM_PROCESSES, MMADA_PROCESS_ID not set"),
    ({"MMADA_COORDINATOR": "h", "MMADA_NUM_PROCESSES": "2", "MMADA_PROCESS_ID": "0"}, "expected host:port"),
    ({"MMADA_COORDINATOR": "h:1", "MMADA_NUM_PROCESSES": "2", "MMADA_PROCESS_ID": "2"}, r"must lie in \[0, "),
    ({"MMADA_COORDINATOR": "h:1", "MMADA_NUM_PROCESSES": "two", "MMADA_PROCESS_ID": "0"}, "not an integer"),
    ({"MMADA_DISTRIBUTED": "maybe"}, "expected 0 or 1")])
def test_plan_errors_name_the_variable(env, match):
  with pytest.raises(distributed.DistributedError, match=match):
    distributed.plan(env, tpu_vm=False)


def test_single_host_initialize_is_a_no_op():
  if distributed.on_cloud_tpu_vm():
    pytest.skip("on a Cloud TPU VM the default is to initialise")
  assert distributed.initialize({}, log=None).mode == "single" and not jax.distributed.is_initialized()


def test_local_rows():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  assert distributed.local_rows(NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), 16) == slice(0, 16)
  assert distributed.local_rows(NamedSharding(mesh, PartitionSpec()), 16) == slice(0, 16)


if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] != "worker":
    sys.exit("usage: python tests/test_multihost.py worker OUT_DIR")
  worker(sys.argv[2])
