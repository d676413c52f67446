"""AOT compilation of the train step for TPU topologies from this CPU host (needs libtpu: pip install -e '.[tpu]')."""

import importlib.util
import os
import subprocess
import sys

import pytest

from mmada_jax.parallel import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
