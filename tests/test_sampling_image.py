"""The text-to-image sampler against every official t2i fixture set (injected noise), and its own guarantees.

A set is `t2i_generate_<C>*.npz` in the parity directory (MMADA_PARITY_DIR overrides it), run with the weights of
`backbone_<C>`; its runs are the `<run>__` key prefixes, their parameters come from the index JSON that names the file
(`sampling_fixtures.json`), else from the run name and the array shapes (docs/parity.md §8).
"""

import os
import subprocess
import sys

import jax
import jax.extend
import numpy as np
import pytest

import sampling_reference as sr
from conftest import FIXTURES, parity_dir
from sampling_reference import backbones  # noqa: F401  (fixture shared by the sampler tests)
from mmada_jax.diffusion import sampling_image as si

KIND = "t2i_generate"
SETS = sr.sampler_sets(parity_dir(), KIND)
HERE = os.path.dirname(os.path.abspath(__file__))
STORED = {"codes": "output", "final_input_ids": "final_input_ids", "trace_input_ids": "trace_input_ids",
          "masking": "masking", "mask_len": "mask_len", "temperature": "temperature"}


@pytest.fixture(scope="module")
def tiny(backbones):
  """Backbone A and its t2i fixture inputs (always the copies in tests/fixtures)."""
  model, params, config = backbones(FIXTURES / "parity", "backbone_A", "unstacked")
  return model, params, config, np.load(FIXTURES / "parity" / "t2i_generate_A.npz")


def _vocab(p):
  return dict(mask_id=p["mask_id"], image_offset=p["image_offset"], codebook_size=p["codebook_size"],
              num_image_tokens=p["seq_len"])


def _inputs(f):
  return f["input_ids"], f["attention_mask"], f["uncond_input_ids"], f["uncond_attention_mask"]


def test_sets_exist():
  assert SETS, f"no {KIND}_<C>*.npz fixture set found in {parity_dir()} (set MMADA_PARITY_DIR)"


@pytest.mark.parametrize("stem,run", SETS or [("none", "none")], ids=[f"{a}-{b}" for a, b in SETS] or ["none"])
def test_parity(backbones, stem, run):
  if stem == "none":
    pytest.fail(f"no {KIND} fixture set found in {parity_dir()}")
  model, params, config = backbones(parity_dir(), sr.backbone_stem(stem, KIND))
  f = np.load(parity_dir() / f"{stem}.npz")
  p = sr.t2i_params(parity_dir(), stem, run, f, config)
  settings = si.ImageSampling(timesteps=p["timesteps"], guidance_scale=p["guidance_scale"],
                              temperature=p["temperature"], noise_schedule=p["noise_schedule"], trace=True)
  # The official code takes the unconditional text prefix from `resolution + 1` positions; with the true prefix
  # length as default, the fixture's `resolution` must agree with it.
  assert p["prefix_len"] == f["input_ids"].shape[1] - p["seq_len"] - 2
  out = si.t2i_generate(model, params, *_inputs(f), **_vocab(p), settings=settings,
                        noise={"sample": f[f"{run}__gumbel_sample"], "mask": f[f"{run}__gumbel_mask"]})
  for ours, theirs in STORED.items():
    np.testing.assert_array_equal(np.asarray(out[ours]), f[f"{run}__{theirs}"], err_msg=f"{run}: {ours}")


def test_schedule_tables():
  cos = si.ImageSampling(timesteps=6, temperature=1.0)
  # float32 cos(pi/3) = 0.49999997: 31, not 32 (docs/parity.md §8)
  np.testing.assert_array_equal(si.mask_len_table(cos, 64), [61, 55, 45, 31, 16, -1])
  np.testing.assert_allclose(si.temperature_table(cos), [5 / 6, 5 / 9, 5 / 18, 5 / 54, 5 / 324, 0.0], rtol=1e-12)
  linear = si.ImageSampling(timesteps=4, temperature=2.0, noise_schedule="linear", temperature_annealing="linear")
  np.testing.assert_array_equal(si.mask_len_table(linear, 16), [12, 8, 4, 0])
  np.testing.assert_allclose(si.temperature_table(linear), [1.5, 1.0, 0.5, 0.0])
  from mmada_jax import config as config_lib

  demo = si.ImageSampling.from_config(config_lib.get_base_config().sampling.image, trace=True)
  assert demo == si.ImageSampling(timesteps=15, guidance_scale=3.5, temperature=1.0, trace=True)


def test_keyed_noise_and_options(tiny):
  """Noise from a PRNG key: reproducible, complete codes, keys matter; MaskGIT annealing runs in the same program
  shape; the output is the last draw and at least one slot was re-masked at every step but the last."""
  model, params, config, f = tiny
  vocab = dict(mask_id=230, image_offset=236, codebook_size=64, num_image_tokens=64)
  s = si.ImageSampling(timesteps=5, guidance_scale=2.0, temperature=1.0, temperature_annealing="linear",
                       trace=True)
  with pytest.raises(ValueError, match="needs rng"):
    si.t2i_generate(model, params, *_inputs(f), **vocab, settings=s)
  a, b, c = (si.t2i_generate(model, params, *_inputs(f), **vocab, settings=s, rng=jax.random.key(k)) for k in (0, 0, 1))
  codes = np.asarray(a["codes"])
  assert codes.shape == (2, 64) and codes.min() >= 0 and codes.max() < 64
  np.testing.assert_array_equal(codes, b["codes"])
  assert (codes != np.asarray(c["codes"])).any()
  masking = np.asarray(a["masking"])
  np.testing.assert_array_equal(masking.sum(-1), a["mask_len"])
  final = np.asarray(a["final_input_ids"])[:, -65:-1]
  np.testing.assert_array_equal(np.where(masking[-1], 230, codes + 236), final)


def test_one_compiled_program(tiny, monkeypatch):
  model, params, config, f = tiny
  calls = []
  logits = si._image_logits
  monkeypatch.setattr(si, "_image_logits", lambda *a: calls.append(1) or logits(*a))
  vocab = dict(mask_id=230, image_offset=236, codebook_size=64, num_image_tokens=64)
  sizes = []
  for steps in (3, 12):
    s = si.ImageSampling(timesteps=steps, guidance_scale=1.0)
    layout = si._Layout(num_tokens=64, codebook_size=64, image_offset=236, mask_id=230, prefix_len=8, length=74)
    ids, mask, un_ids, un_mask = (np.asarray(a) for a in _inputs(f))
    jaxpr = jax.make_jaxpr(lambda p: si._t2i(model, p, ids, mask.astype(bool), un_ids, un_mask.astype(bool), None,
                                             jax.random.key(0), settings=s, layout=layout))(params)
    names = _primitives(jaxpr.jaxpr)
    sizes.append(len(names))
    assert "while" in names or "scan" in names  # fori_loop with static bounds lowers to a rolled scan
  assert len(calls) == 2 and sizes[0] == sizes[1]  # one backbone call per program, whatever the step count
  s = si.ImageSampling(timesteps=4)
  before = si._t2i._cache_size()
  for k in range(2):
    si.t2i_generate(model, params, f["input_ids"], f["attention_mask"], **vocab, settings=s, rng=jax.random.key(k))
  assert si._t2i._cache_size() == before + 1


def test_sample_temperature_scales_the_draw_noise(tiny):
  """The token draw is argmax(log p + τ·Gumbel): τ = 0.5 equals τ = 1 with halved noise, τ = 0 equals τ = 1 with
  none (greedy), and τ = 1 is the official draw."""
  model, params, config, f = tiny
  vocab = dict(mask_id=230, image_offset=236, codebook_size=64, num_image_tokens=64)
  rng = np.random.default_rng(0)
  noise = {"sample": rng.gumbel(size=(4, 2, 64, 64)).astype(np.float32),
           "mask": rng.gumbel(size=(4, 2, 64)).astype(np.float32)}
  run = lambda tau, scale: np.asarray(si.t2i_generate(
      model, params, *_inputs(f), **vocab, settings=si.ImageSampling(timesteps=4, guidance_scale=1.0,
                                                                     sample_temperature=tau),
      noise=dict(noise, sample=noise["sample"] * np.float32(scale)))["codes"])
  official = run(1.0, 1.0)
  assert (official != run(0.0, 1.0)).any()
  np.testing.assert_array_equal(run(0.5, 1.0), run(1.0, 0.5))
  np.testing.assert_array_equal(run(0.0, 1.0), run(1.0, 0.0))


def test_toyworld_trains_with_the_samplers_attention(tiny):
  """The t2i sampler hard-masks the [iPAD] positions of a short prompt. The official training pass only down-weights
  them (`float_bias`), so a model trained from scratch that way sees other hidden states at sampling time than in
  training; the ToyWorld stages therefore train with `pair_mask`, which gives exactly the sampler's hidden states."""
  from mmada_jax import config as config_lib
  from mmada_jax.diffusion import losses

  for stage in ("stage1", "cot", "text"):
    c = config_lib.load_config(os.path.join(os.path.dirname(HERE), "experiments", f"toyworld.py:{stage}"))
    assert c.loss.attention == "pair_mask", stage
  model, params, config, f = tiny
  ids, valid = np.asarray(f["input_ids"]), np.asarray(f["attention_mask"])
  assert (valid == 0).any()  # the fixture prompts are padded
  hidden = lambda mask: np.asarray(model.apply({"params": params}, ids, mask, output="hidden"))[:, -65:-1]
  sampler = hidden(valid.astype(bool))
  train = {a: hidden(losses.attention_mask_for([("t2i", {"input_ids": ids, "valid_mask": valid})], a))
           for a in ("pair_mask", "float_bias")}
  np.testing.assert_allclose(train["pair_mask"], sampler, rtol=1e-5, atol=1e-5)
  assert np.abs(train["float_bias"] - sampler).max() > 1e-3


def _primitives(jaxpr) -> list[str]:
  """Names of every equation's primitive, nested programs included."""
  out = []
  for eqn in jaxpr.eqns:
    out.append(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _primitives(sub)
  return out


def test_null_prompt_uses_the_true_prefix_length():
  from mmada_jax import config as config_lib
  from mmada_jax.tokens import prompting
  from mmada_jax.tokens import vocab as vocab_lib

  c = config_lib.load_config(os.path.join(os.path.dirname(HERE), "experiments", "tiny.py"))
  prompter = prompting.Prompter.from_config(c)
  ids, mask = si.null_prompt(prompter, 2)
  f = np.load(FIXTURES / "parity" / "t2i_generate_A.npz")
  np.testing.assert_array_equal(ids, f["uncond_input_ids"])
  np.testing.assert_array_equal(mask, f["uncond_attention_mask"])
  assert si.image_vocab_args(vocab_lib.Vocab.from_config(c.vocab)) == dict(
      mask_id=230, image_offset=236, codebook_size=64, num_image_tokens=64)


@pytest.mark.parametrize("kwargs,message", [
    (dict(timesteps=0), "timesteps must be a positive integer"),
    (dict(noise_schedule="arccos"), "noise_schedule must be one of"),
    (dict(temperature_annealing="exp"), "temperature_annealing must be one of"),
    (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
    (dict(sample_temperature=-0.5), "sample_temperature must be >= 0"),
])
def test_bad_settings_are_named(kwargs, message):
  with pytest.raises(ValueError) as e:
    si.ImageSampling(**kwargs)
  assert message in str(e.value)


def test_bad_inputs_are_named(tiny):
  model, params, config, f = tiny
  vocab = dict(mask_id=230, image_offset=236, codebook_size=64, num_image_tokens=64)
  s = si.ImageSampling(timesteps=2, guidance_scale=1.0)
  ids, mask, un_ids, un_mask = _inputs(f)
  with pytest.raises(ValueError, match="needs uncond_input_ids"):
    si.t2i_generate(model, params, ids, mask, **vocab, settings=s, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="uncond_attention_mask has shape"):
    si.t2i_generate(model, params, ids, mask, un_ids, un_mask[:, 1:], **vocab, settings=s, rng=jax.random.key(0))
  with pytest.raises(ValueError, match=r"noise\['mask'\] has shape"):
    si.t2i_generate(model, params, ids, mask, un_ids, un_mask, **vocab, settings=s,
                    noise={"sample": np.zeros((2, 128, 64)), "mask": np.zeros((3, 2, 64))})
  with pytest.raises(ValueError, match="text_prefix_len=70 must be in"):
    si.t2i_generate(model, params, ids, mask, un_ids, un_mask, **vocab, settings=s, text_prefix_len=70,
                    rng=jax.random.key(0))


def _run_module(parity: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, MMADA_PARITY_DIR=parity)
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k",
                         "test_parity or test_sets_exist", os.path.join(HERE, "test_sampling_image.py")], env=env,
                        capture_output=True, text=True, cwd=HERE)


def test_other_fixture_sets(tmp_path):
  """Other codebooks, image lengths, prefixes, step counts, guidance and temperatures, found through the env var."""
  sr.write_other_sets(tmp_path)
  res = _run_module(str(tmp_path))
  assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
  for test_id in ("t2i_generate_G-t1_nocfg_temp1", "t2i_generate_G-t2_cfg2_temp0.5", "t2i_generate_H-t1_cfg3_temp1"):
    assert f"PASSED test_sampling_image.py::test_parity[{test_id}]" in res.stdout, res.stdout[-3000:]
  assert "t2i_generate_A" not in res.stdout


def test_empty_parity_dir_fails(tmp_path):
  res = _run_module(str(tmp_path))
  assert res.returncode != 0 and f"no {KIND}_<C>*.npz fixture set found" in res.stdout
