"""Multi-host start-up: `jax.distributed` initialisation, called before any JAX computation (train, rl).

Where each process learns who it is (the first rule that applies wins):
  1. explicit settings, for GPU / CPU clusters and `launch/gpu_slurm.py`:
       MMADA_COORDINATOR=host:port  MMADA_NUM_PROCESSES=N  MMADA_PROCESS_ID=i  [MMADA_LOCAL_DEVICE_IDS=0,1,...]
     (JAX's own JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID are read when ours are absent);
  2. MMADA_DISTRIBUTED=0 turns multi-host off; MMADA_DISTRIBUTED=1 forces `jax.distributed.initialize()` with JAX's
     own cluster detection (Slurm, Open MPI, Cloud TPU, GKE);
  3. a Cloud TPU VM (TPU chips under /dev and libtpu installed): `jax.distributed.initialize()` without arguments,
     which reads the workers and slices of the TPU VM or queued resource from the metadata server (correct on a
     single-host TPU VM too: one process);
  4. a Slurm step or Open MPI job with more than one task: JAX's detection of that launcher;
  5. otherwise a single host: nothing is done.

MMADA_DISTRIBUTED_TIMEOUT (seconds, default 300) bounds the wait for the other processes, so a worker that never
starts fails the job instead of hanging it (jax#22436: one worker initialising alone deadlocks).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from typing import Callable, Mapping

import jax


class DistributedError(ValueError):
  """Multi-host settings that are incomplete or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` does: mode 'single' (nothing), 'explicit' (the arguments below) or 'auto' (JAX detects)."""
  mode: str
  reason: str
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  timeout_s: int = 300


def _first(env: Mapping[str, str], *names: str) -> tuple[str | None, str | None]:
  """(name, value) of the first of `names` set to a non-empty value in `env`."""
  for name in names:
    if env.get(name, "").strip():
      return name, env[name].strip()
  return None, None


def _int(name: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={value!r} is not an integer") from None


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM: TPU chips are visible as devices and libtpu is installed."""
  chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def _explicit(env: Mapping[str, str], timeout: int) -> Plan | None:
  """The plan from MMADA_* (or JAX_*) coordinator settings, or None when neither names a coordinator."""
  c_name, coordinator = _first(env, "MMADA_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
  n_name, n = _first(env, "MMADA_NUM_PROCESSES", "JAX_NUM_PROCESSES")
  p_name, p = _first(env, "MMADA_PROCESS_ID", "JAX_PROCESS_ID")
  if coordinator is None and n is None and p is None:
    return None
  missing = [name for name, value in (("MMADA_COORDINATOR", coordinator), ("MMADA_NUM_PROCESSES", n),
                                      ("MMADA_PROCESS_ID", p)) if value is None]
  if missing:
    raise DistributedError(f"multi-host settings incomplete: {', '.join(missing)} not set (set all three of "
                           "MMADA_COORDINATOR=host:port, MMADA_NUM_PROCESSES, MMADA_PROCESS_ID, or none)")
  if ":" not in coordinator:
    raise DistributedError(f"{c_name}={coordinator!r}: expected host:port")
  num, pid = _int(n_name, n), _int(p_name, p)
  if num < 1 or not 0 <= pid < num:
    raise DistributedError(f"{p_name}={pid} must lie in [0, {n_name}={num})")
  ids_name, ids = _first(env, "MMADA_LOCAL_DEVICE_IDS")
  local = tuple(_int(ids_name, x) for x in ids.split(",") if x.strip()) if ids else None
  if num == 1:
    return Plan("single", f"{n_name}=1", timeout_s=timeout)
  return Plan("explicit", f"{c_name}, {n_name}, {p_name}", coordinator, num, pid, local, timeout)


def plan(env: Mapping[str, str] | None = None, tpu_vm: bool | None = None) -> Plan:
  """Decides how to initialise from the environment (no side effects; see the module docstring for the order)."""
  env = os.environ if env is None else env
  t_name, t = _first(env, "MMADA_DISTRIBUTED_TIMEOUT")
  timeout = _int(t_name, t) if t else 300
  explicit = _explicit(env, timeout)
  if explicit is not None:
    return explicit
  switch = env.get("MMADA_DISTRIBUTED", "").strip().lower()
  if switch in ("0", "false", "no", "off"):
    return Plan("single", "MMADA_DISTRIBUTED=0", timeout_s=timeout)
  if switch in ("1", "true", "yes", "on"):
    return Plan("auto", "MMADA_DISTRIBUTED=1", timeout_s=timeout)
  if switch:
    raise DistributedError(f"MMADA_DISTRIBUTED={switch!r}: expected 0 or 1")
  if on_cloud_tpu_vm() if tpu_vm is None else tpu_vm:
    return Plan("auto", "Cloud TPU VM", timeout_s=timeout)
  for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if env.get(name, "").strip().isdigit() and int(env[name]) > 1:
      return Plan("auto", f"{name}={env[name]}", timeout_s=timeout)
  return Plan("single", "no multi-host launcher detected", timeout_s=timeout)


def initialize(env: Mapping[str, str] | None = None, log: Callable[[str], None] | None = print) -> Plan:
  """Initialises `jax.distributed` when this process is one of several; a no-op on a single host or when already done.

  Call it first thing in a command, before anything touches a JAX device. Returns the plan that was followed.
  """
  p = plan(env)
  if p.mode == "single" or jax.distributed.is_initialized():
    return p
  if p.mode == "explicit":
    kwargs = dict(coordinator_address=p.coordinator, num_processes=p.num_processes, process_id=p.process_id)
    if p.local_device_ids is not None:
      kwargs["local_device_ids"] = list(p.local_device_ids)
    jax.distributed.initialize(**kwargs, initialization_timeout=p.timeout_s)
  else:
    jax.distributed.initialize(initialization_timeout=p.timeout_s)
  if log is not None:
    log(f"jax.distributed ({p.reason}): process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} of {jax.device_count()} devices local")
  return p


def local_rows(sharding: jax.sharding.Sharding, global_rows: int) -> slice:
  """The consecutive rows [start, stop) of a [global_rows, ...] array that this process's devices hold under
  `sharding` — what it must pass to `jax.make_array_from_process_local_data` when every host reads the same global
  batch (data pipelines that read disjoint per-host shards need not care)."""
  index_map = sharding.addressable_devices_indices_map((global_rows,))
  starts = sorted({(idx[0].start or 0, global_rows if idx[0].stop is None else idx[0].stop)
                   for idx in index_map.values()})
  start, stop = starts[0][0], starts[-1][1]
  covered = sum(b - a for a, b in starts)
  if covered != stop - start:
    raise DistributedError(f"this process's rows under {sharding} are not consecutive: {starts}")
  return slice(start, stop)
