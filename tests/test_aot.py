"""AOT compilation of the train step for TPU topologies from this CPU host (needs libtpu: pip install -e '.[tpu]')."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mmada_jax.parallel import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "tiny.py")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[tpu]'); "
                                  ".ci/run installs it so these run in CI")


def test_topology_names():
  assert aot.parse_topology("v5e-16")[1] == (4, 4)
  assert aot.parse_topology("v5litepod-256")[1] == (16, 16)
  assert aot.parse_topology("v5p-128")[1] == (4, 4, 4)
  assert aot.parse_topology("v4-8")[1] == (2, 2, 1)
  assert aot.parse_topology("v6e-8")[1] == (2, 4)
  with pytest.raises(aot.TopologyError, match="unknown TPU topology 'v9-8'"):
    aot.parse_topology("v9-8")
  with pytest.raises(aot.TopologyError, match="power-of-two"):
    aot.parse_topology("v5e-12")


def _compile(*args):
  # A fresh process per compile: libtpu is initialised once per process and the tests' fake CPU devices stay apart.
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return subprocess.run([sys.executable, "-m", "mmada_jax.cli", "compile", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=900)


@needs_libtpu
def test_tiny_fits_on_v5e_4():
  res = _compile("--config", "experiments/toyworld.py:text", "--topology", "v5e-4")
  assert res.returncode == 0, res.stdout + res.stderr[-3000:]
  assert "fits:" in res.stdout and "of 16 GiB per chip" in res.stdout


@needs_libtpu
def test_8b_does_not_fit_on_v5e_4():
  res = _compile("--config", "experiments/mmada_8b_stages.py:1.1", "--topology", "v5e-4",
                 "--config.data.batch_size_t2i=8", "--config.data.batch_size_lm=8", "--config.data.batch_size_mmu=8")
  assert res.returncode == 3, res.stdout + res.stderr[-3000:]
  assert "DOES NOT FIT" in res.stdout


@needs_libtpu
def test_tiny_unigrpo_step_fits_on_v5e_4():
  """`--step rl`: UniGRPO's policy step and its log-prob precompute, both reported (the reference counted)."""
  res = _compile("--config", TINY, "--topology", "v5e-4", "--step", "rl", "--config.rl.prompt_len=16",
                 "--config.rl.gen_length=16", "--config.rl.block_length=16", "--config.rl.masks_per_step=2",
                 "--config.rl.micro_batches=2")
  assert res.returncode == 0, res.stdout + res.stderr[-3000:]
  assert "UniGRPO policy step: fits:" in res.stdout and "UniGRPO old/reference log-probs: fits:" in res.stdout
  reports = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
  assert [r["program"] for r in reports] == ["UniGRPO policy step", "UniGRPO old/reference log-probs"]
  assert reports[0]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert reports[0]["resident_gib"] > 0 and reports[1]["resident_gib"] > reports[0]["resident_gib"]  # ref; Adam


@needs_libtpu
def test_estimate_extrapolates_the_cost_model_over_layers():
  """`--estimate`: XLA's time of 1- and 2-layer unrolled copies, extrapolated to 4 scanned layers with 2
  micro-batches, matches XLA's own time of the 4-layer unrolled one-micro-batch program."""
  common = ("--config", TINY, "--topology", "v5e-4", "--config.model.num_layers=4", "--config.data.batch_size_t2i=8",
            "--config.data.batch_size_lm=8", "--config.data.batch_size_mmu=8")
  res = _compile(*common, "--config.train.micro_batches=2", "--estimate")
  assert res.returncode == 0, res.stdout + res.stderr[-3000:]
  est = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")][-1]
  assert est["program"] == "train step" and "XLA cost model extrapolated to 4 layers" in res.stdout
  t1, t2 = est["cost_model_1_layer_s"], est["cost_model_2_layers_s"]
  assert 0 < t1 < t2 and est["extrapolated_step_s"] == pytest.approx(t1 + 3 * (t2 - t1), rel=1e-3)
  direct = _compile(*common, "--config.model.scan_layers=false")
  rep = [json.loads(line) for line in direct.stdout.splitlines() if line.startswith("{")][0]
  assert est["extrapolated_step_s"] == pytest.approx(rep["xla_estimated_step_s"], rel=0.05)
  assert est["estimated_mfu"] == pytest.approx(rep["estimated_mfu"], rel=0.05)


def test_rl_batch_must_split_over_the_batch_shards():
  from mmada_jax import config as config_lib
  from mmada_jax.parallel import mesh as mesh_lib, rules as rules_lib

  config = config_lib.load_config(TINY, {"rl.prompts_per_step": "3", "rl.group_size": "3"})
  mesh = mesh_lib.create_mesh(config.sharding)
  with pytest.raises(ValueError, match="9 rows .* not divisible by the 8 batch shards"):
    aot.rl_abstract_batch(config, mesh, rules_lib.resolve_rules("fsdp"), True)


@needs_libtpu
def test_multislice_dp_fsdp_puts_data_over_dcn():
  """Two v5e-4 slices: the `dp_fsdp` preset's hybrid mesh has data = 2 (one per slice, DCN), fsdp = 4 (ICI)."""
  res = _compile("--config", TINY, "--topology", "v5e-4", "--num_slices", "2", "--config.sharding.preset=dp_fsdp",
                 "--config.data.batch_size_t2i=8", "--config.data.batch_size_lm=8", "--config.data.batch_size_mmu=8")
  assert res.returncode == 0, res.stdout + res.stderr[-3000:]
  assert "v5e-4 x 2 slice(s): 8 chips" in res.stdout
  report = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))
  assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and report["fits"]


def test_head_groups_resolve_to_the_target_device_count():
  """`loss.head_groups = 0` means the device count *where the step runs*: the compile must use the topology's, not
  this host's (with 1 group the gathered head would evaluate the logits of the whole global batch at once)."""
  from mmada_jax import config as config_lib

  config = config_lib.load_config(TINY)
  assert config.loss.head_groups == 0
  resolved = aot.for_devices(config, list(range(32)))
  assert resolved.loss.head_groups == 32 and config.loss.head_groups == 0  # the caller's config is untouched
  explicit = config_lib.load_config(TINY, {"loss.head_groups": "4"})
  assert aot.for_devices(explicit, list(range(32))).loss.head_groups == 4
