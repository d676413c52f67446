"""The parity tests run unchanged on fixture sets of other shapes: grouped-query attention, another rope theta,
another vocabulary, bfloat16 weights. The sets are written here from an independent float64 NumPy reference
(tests/reference.py, which itself matches the official fixtures), then the parity test module is run on them through
MMADA_PARITY_DIR exactly as a user would."""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np

import reference
from conftest import parity_dir
from mmada_jax.convert import safetensors_io as st


def test_reference_matches_official_fixture():
  d = parity_dir()
  for stem in sorted(p.stem for p in d.glob("backbone_*.safetensors")):
    f = st.SafetensorsFile(str(d / f"{stem}.safetensors"))
    sd = {k: f.get(k) for k in f.tensors}
    cfg = json.loads((d / f"{stem}_config.json").read_text())
    io = np.load(d / f"{stem}_io.npz")
    logits, hidden = reference.forward(sd, cfg, io["input_ids"])
    assert np.abs(logits - io["logits_nomask"]).max() < 1e-4
    assert np.abs(hidden - io["hidden_states_nomask"]).max() < 1e-4


def test_parity_suite_on_other_shapes(tmp_path):
  reference.write_fixture_set(tmp_path, "backbone_G", d=48, heads=6, kv_heads=3, layers=3, mlp=80, vocab=173,
                              theta=10000.0, seed=1)
  reference.write_fixture_set(tmp_path, "backbone_H", d=32, heads=2, kv_heads=2, layers=1, mlp=40, vocab=97,
                              theta=1e6, seed=2, dtype=ml_dtypes.bfloat16)
  env = dict(os.environ, MMADA_PARITY_DIR=str(tmp_path))
  here = os.path.dirname(os.path.abspath(__file__))
  res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                        os.path.join(here, "test_backbone_parity.py")], env=env, capture_output=True, text=True,
                       cwd=here)
  assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
  for stem in ("backbone_G", "backbone_H"):
    assert f"test_logits_and_hidden_states[{stem}-stacked]" in res.stdout
    assert f"test_round_trip_is_byte_identical[{stem}-unstacked]" in res.stdout
  assert "backbone_A" not in res.stdout


def test_empty_parity_dir_fails(tmp_path):
  env = dict(os.environ, MMADA_PARITY_DIR=str(tmp_path))
  here = os.path.dirname(os.path.abspath(__file__))
  res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.join(here, "test_backbone_parity.py")], env=env, capture_output=True, text=True,
                       cwd=here)
  assert res.returncode != 0 and "no backbone fixture set found" in res.stdout
