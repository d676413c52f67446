"""Training the tokenizer from scratch: the loss falls, an interrupted run resumes to the same state, export works."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmada_jax import config as config_lib
from mmada_jax.convert import magvit as cm
from mmada_jax.convert import safetensors_io as st
from mmada_jax.models import magvit as mv
from mmada_jax.train import magvit as mt

EXPERIMENTS = os.path.join(os.path.dirname(__file__), os.pardir, "experiments")


def _tiny_config(steps: int, checkpoint_every: int = 1000):
  config = config_lib.load_config_file(os.path.join(EXPERIMENTS, "magvit_toyworld.py"))
  g = config.magvit
  g.resolution, g.channels, g.norm_groups, g.codebook_bits = 16, 8, 4, 4
  g.encoder_channel_mult = g.decoder_channel_mult = (1, 2)
  g.encoder_num_res_blocks = g.decoder_num_res_blocks = (1, 1)
  t = g.train
  t.steps, t.batch_size, t.learning_rate, t.warmup_steps = steps, 8, 3e-3, 2
  t.log_every, t.checkpoint_every, t.keep = 1, checkpoint_every, 3
  config.vocab.codebook_size = 16
  return config_lib.validate(config)


def _images(n=16, size=16, seed=0) -> np.ndarray:
  """Flat-coloured rectangles on black, float32 [n, size, size, 3] in [-1, 1]."""
  rng = np.random.default_rng(seed)
  out = np.zeros((n, size, size, 3), np.float32)
  for i in range(n):
    y, x = rng.integers(0, size // 2, 2)
    h, w = rng.integers(3, size // 2, 2)
    out[i, y:y + h, x:x + w] = rng.choice([0.0, 1.0], 3)
  return out * 2 - 1


STEPS = 40


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """One uninterrupted 40-step run (logs kept), shared by the tests below."""
  workdir = tmp_path_factory.mktemp("full")
  logs = []
  res = mt.train(_tiny_config(steps=STEPS, checkpoint_every=20), str(workdir), images=_images(), log=logs.append)
  return res, logs, workdir


def test_loss_falls_and_checkpoints_export(full_run, tmp_path):
  res, logs, workdir = full_run
  config = _tiny_config(steps=STEPS)
  first = float(logs[0].split("recon=")[1].split()[0])
  last = res["metrics"]["recon"]
  assert res["state_step"] == STEPS and last < 0.6 * first, (first, last)
  params, cfg = cm.load_magvit(str(workdir / "params"), config.magvit)
  out = cm.export_magvit(str(workdir / "params"), str(tmp_path / "export"))
  sd = st.SafetensorsFile(out)
  assert "encoder.down.0.block.0.conv1.weight" in sd.tensors and "quantize.embedding" in sd.tensors
  np.testing.assert_array_equal(sd.get("encoder.conv_in.weight"),
                                np.asarray(params["encoder"]["conv_in"]["kernel"]).transpose(3, 2, 0, 1))
  recon = mt.reconstruct(params, mv.MagvitV2(cfg), _images(n=3))
  assert recon.shape == (3, 16, 16, 3) and np.isfinite(recon).all()


def test_interrupted_run_resumes_to_the_same_state(full_run, tmp_path):
  full = full_run[0]
  config = _tiny_config(steps=STEPS, checkpoint_every=20)
  cut = mt.train(config, str(tmp_path), images=_images(), log=lambda s: None, stop_after=15)
  assert cut["state_step"] == 15
  logs = []
  resumed = mt.train(config, str(tmp_path), images=_images(), log=logs.append)
  assert "resumed from step 15" in logs[0] and resumed["state_step"] == STEPS
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), full["params"], resumed["params"])


def test_bad_batch_and_image_sizes_are_named(tmp_path):
  config = _tiny_config(steps=1)
  config.magvit.train.batch_size = 3
  with pytest.raises(ValueError, match="batch_size=3 is not divisible"):
    mt.train(config, str(tmp_path), images=_images(), log=lambda s: None)
  config.magvit.train.batch_size = 8
  with pytest.raises(ValueError, match="not divisible by the downsampling factor 2"):
    mt.train(config, str(tmp_path), images=_images(size=15), log=lambda s: None)


def test_straight_through_gradient_and_loss_values():
  z = jnp.asarray([[[[0.5, -2.0]]]])
  zq, aux = mv.lfq(z, beta=0.25, commit_multiplier=1.0, entropy_multiplier=1.0)
  np.testing.assert_array_equal(zq, [[[[1.0, -1.0]]]])
  np.testing.assert_allclose(aux["quantizer_loss"], 1.25 * np.mean([(1 - 0.5) ** 2, (-1 + 2.0) ** 2]), rtol=1e-6)
  g = jax.grad(lambda z: jnp.sum(mv.lfq(z)[0] * jnp.asarray([3.0, 5.0])))(z)
  np.testing.assert_array_equal(g, [[[[3.0, 5.0]]]])  # identity through the quantiser
  # Commitment gradient: d/dz [mean((sg(zq) - z)^2) + beta * mean((zq_st - sg(z))^2)] = (beta - 1) * (zq - z) (n = 2).
  gc = jax.grad(lambda z: mv.lfq(z, 0.25, 1.0, 0.0)[1]["quantizer_loss"])(z)
  np.testing.assert_allclose(gc, [[[[-0.75 * 0.5, -0.75 * 1.0]]]], rtol=1e-6)
