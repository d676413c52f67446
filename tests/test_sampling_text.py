"""The text sampler against every official text-generation fixture set, and its own guarantees.

A set is `text_generate_<C>*.npz` in the parity directory (MMADA_PARITY_DIR overrides it), run with the weights of
`backbone_<C>`; its settings are the `<setting>__` key prefixes, their parameters come from the index JSON that names
the file (`sampling_fixtures.json`), else from the setting name and the array shapes (docs/parity.md §7).
"""

import functools
import os
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import sampling_reference as sr
from conftest import FIXTURES, parity_dir
from sampling_reference import backbones  # noqa: F401  (fixture shared by the sampler tests)
from mmada_jax.diffusion import sampling_text as st

KIND = "text_generate"
SETS = sr.sampler_sets(parity_dir(), KIND)
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def tiny(backbones):
  """The official fixture backbone A (always the copy in tests/fixtures, whatever MMADA_PARITY_DIR says)."""
  return backbones(FIXTURES / "parity", "backbone_A", "unstacked")


def test_sets_exist():
  assert SETS, f"no {KIND}_<C>*.npz fixture set found in {parity_dir()} (set MMADA_PARITY_DIR)"


@pytest.mark.parametrize("stem,setting", SETS or [("none", "none")],
                         ids=[f"{stem}-{setting}" for stem, setting in SETS] or ["none"])
def test_parity(backbones, stem, setting):
  if stem == "none":
    pytest.fail(f"no {KIND} fixture set found in {parity_dir()}")
  model, params, config = backbones(parity_dir(), sr.backbone_stem(stem, KIND))
  f = np.load(parity_dir() / f"{stem}.npz")
  p = sr.text_params(parity_dir(), stem, setting, f, config)
  settings = st.TextSampling(gen_length=p["gen_length"], block_length=p["block_length"], steps=p["steps"],
                             temperature=p["temperature"], cfg_scale=p["cfg_scale"], remasking=p["remasking"],
                             trace=True)
  mask = f[f"{setting}__prompt_attention_mask"] if p["pass_mask"] else None
  out = st.generate(model, params, f[f"{setting}__prompt"], mask, mask_id=p["mask_id"], settings=settings)
  np.testing.assert_array_equal(out["tokens"], f[f"{setting}__output"])
  trace = f[f"{setting}__trace_x"]
  assert int(out["calls"]) == p["n_model_calls"] == trace.shape[0]
  np.testing.assert_array_equal(out["trace_x"], trace)


def _gen_region(out, gen_length):
  return np.asarray(out["tokens"])[:, -gen_length:]


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_left_padded_row_equals_prompt_alone(tiny, cfg_scale):
  model, params, config = tiny
  mask_id = config["mask_token_id"]
  rng = np.random.default_rng(0)
  long, short = rng.integers(0, 228, 9), rng.integers(0, 228, 5)
  pad_id = 17  # an ordinary token: padding must be invisible whatever its id
  batch, batch_mask = st.left_pad([long, short], pad_id)
  np.testing.assert_array_equal(batch_mask, [[1] * 9, [0] * 4 + [1] * 5])
  s = st.TextSampling(gen_length=16, block_length=8, steps=8, cfg_scale=cfg_scale)
  both = _gen_region(st.generate(model, params, batch, batch_mask, mask_id=mask_id, settings=s), 16)
  alone = _gen_region(st.generate(model, params, short[None], mask_id=mask_id, settings=s), 16)
  np.testing.assert_array_equal(both[1], alone[0])
  if cfg_scale == 0:  # without the mask the pads are attended to and the padded row changes
    unmasked = _gen_region(st.generate(model, params, batch, mask_id=mask_id, settings=s), 16)
    assert (unmasked[1] != alone[0]).any()


def test_matches_reference_when_mask_is_proposed(tiny):
  """Block-only logits stay exact when earlier positions still hold a proposed [MASK] (full-vocabulary argmax)."""
  model, params, config = tiny
  sd, cfg = sr.official_state_dict(FIXTURES / "parity", "backbone_A")
  mask_id = config["mask_token_id"]
  f = np.load(FIXTURES / "parity" / "text_generate_A.npz")
  prompt = f["s1_block8_steps16__prompt"]
  favourite = np.bincount(f["s1_block8_steps16__output"][:, 8:].ravel()).argmax()
  # Make [MASK] win wherever the most frequent answer token would: proposed [MASK]s stay masked and are revisited.
  head = np.array(params["lm_head"]["kernel"])
  head[:, mask_id] = 1.05 * head[:, favourite]
  params = dict(params, lm_head={"kernel": head})
  key = "model.transformer.ff_out.weight"
  sd = dict(sd, **{key: np.array(sd[key])})
  sd[key][mask_id] = 1.05 * sd[key][favourite]
  ref, trace, margins = sr.text_generate(sd, cfg, prompt, steps=12, gen_length=24, block_length=8, cfg_scale=0.0,
                                         mask_id=mask_id)
  assert min(margins.values()) > 1e-5  # fp32 confidences resolve gaps far below this
  starts = 8 + 8 * (np.arange(12) // 4)
  stale = [(trace[c][:, :starts[c]] == mask_id).any() for c in range(12)]
  assert any(stale), "the case meant to exercise earlier masked positions did not occur"
  s = st.TextSampling(gen_length=24, block_length=8, steps=12, trace=True)
  out = st.generate(model, params, prompt, mask_id=mask_id, settings=s)
  np.testing.assert_array_equal(out["trace_x"], trace)
  np.testing.assert_array_equal(out["tokens"], ref)


def test_one_compiled_program(tiny, monkeypatch):
  """Blocks and steps run inside one jitted program: one backbone call in the traced program, one compilation, and
  a program whose size does not grow with the number of blocks or steps."""
  model, params, config = tiny
  calls = []
  hidden = st._Forward.hidden
  monkeypatch.setattr(st._Forward, "hidden", lambda self, *a: calls.append(1) or hidden(self, *a))
  prompt = np.random.default_rng(1).integers(0, 228, (2, 6))
  sizes = {}
  for steps, block in ((4, 16), (16, 4)):
    s = st.TextSampling(gen_length=16, block_length=block, steps=steps)
    jaxpr = jax.make_jaxpr(lambda p, x: st._generate(model, p, x, None, jax.random.key(0), settings=s,
                                                     mask_id=config["mask_token_id"]))(params, prompt)
    sizes[steps] = _count_eqns(jaxpr.jaxpr)
  assert len(calls) == 2  # one backbone call traced per program
  assert sizes[4] == sizes[16]
  s = st.TextSampling(gen_length=16, block_length=4, steps=16)
  before = st._generate._cache_size()
  for seed in (2, 3):
    prompt = np.random.default_rng(seed).integers(0, 228, (2, 6))
    out = st.generate(model, params, prompt, mask_id=config["mask_token_id"], settings=s)
    assert int(out["calls"]) == 16
  assert st._generate._cache_size() == before + 1


def _count_eqns(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count_eqns(sub)
  return n


def test_early_stop_at_end_of_turn(tiny):
  model, params, config = tiny
  f = np.load(FIXTURES / "parity" / "text_generate_A.npz")
  prompt, full = f["s1_block8_steps16__prompt"][:1], f["s1_block8_steps16__output"][:1]
  stop = int(full[0, 8 + 8 - 1])  # the last token of the first block becomes the end-of-turn token
  s = st.TextSampling(gen_length=32, block_length=8, steps=16, stop_token=stop)
  out = st.generate(model, params, prompt, mask_id=config["mask_token_id"], settings=s)
  tokens = np.asarray(out["tokens"])
  assert int(out["blocks"]) == 1 and int(out["calls"]) == 4
  np.testing.assert_array_equal(tokens[:, :16], full[:, :16])
  assert (tokens[:, 16:] == config["mask_token_id"]).all()


def test_threshold_decoding(tiny):
  model, params, config = tiny
  mask_id = config["mask_token_id"]
  prompt = np.random.default_rng(4).integers(0, 228, (2, 6))
  one_each = st.generate(model, params, prompt, mask_id=mask_id,
                         settings=st.TextSampling(gen_length=16, block_length=8, threshold=0.9999999))
  official = st.generate(model, params, prompt, mask_id=mask_id,
                         settings=st.TextSampling(gen_length=16, block_length=8, steps=16))
  assert int(one_each["calls"]) == 16  # nothing is that certain: one token per call, the official 1-per-step run
  np.testing.assert_array_equal(one_each["tokens"], official["tokens"])
  greedy = st.generate(model, params, prompt, mask_id=mask_id,
                       settings=st.TextSampling(gen_length=16, block_length=8, threshold=1e-9))
  assert int(greedy["calls"]) == 2  # everything passes: one call per block
  assert not (np.asarray(greedy["tokens"])[:, 6:] == mask_id).all(axis=1).any()


def test_stochastic_sampling_is_keyed(tiny):
  model, params, config = tiny
  mask_id = config["mask_token_id"]
  prompt = np.random.default_rng(5).integers(0, 228, (2, 6))
  s = st.TextSampling(gen_length=16, block_length=8, steps=8, temperature=1.0, remasking="random")
  with pytest.raises(ValueError, match="rng is required"):
    st.generate(model, params, prompt, mask_id=mask_id, settings=s)
  a, b, c = (np.asarray(st.generate(model, params, prompt, mask_id=mask_id, settings=s,
                                    rng=jax.random.key(k))["tokens"]) for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  np.testing.assert_array_equal(a[:, :6], prompt)


def test_dual_cache(tiny):
  """The model's cached modes equal the backbone on a fresh cache (fixture weights); with one call per block (every
  call refreshes the cache) the dual-cache sampler gives the exact tokens; with more calls (guidance, padding) it runs
  and fills."""
  model, params, config = tiny
  mask_id = config["mask_token_id"]
  rng = np.random.default_rng(6)
  ids = jnp.asarray(rng.integers(0, 300, (2, 20)))
  pad = jnp.asarray(np.stack([np.ones(20), np.r_[np.zeros(3), np.ones(17)]]).astype(bool))

  @jax.jit
  def both(params):
    apply = functools.partial(model.apply, {"params": params}, ids, pad, output="hidden")
    h, cache = apply(return_cache=True)
    window = apply(kv_cache=cache, window_start=jnp.int32(8), window=6)
    return apply(), h, window

  ref, h, window = both(params)
  np.testing.assert_allclose(h, ref, atol=1e-5)
  np.testing.assert_allclose(window, ref[:, 8:14], atol=1e-5)
  prompt = rng.integers(0, 228, (2, 6))
  exact, cached = (st.generate(model, params, prompt, mask_id=mask_id,
                               settings=st.TextSampling(gen_length=16, block_length=8, steps=2, dual_cache=cache))
                   for cache in (False, True))
  np.testing.assert_array_equal(cached["tokens"], exact["tokens"])
  multi = st.generate(model, params, prompt, np.ones((2, 6)), mask_id=mask_id,
                      settings=st.TextSampling(gen_length=16, block_length=8, steps=8, cfg_scale=1.0,
                                               dual_cache=True))
  assert int(multi["calls"]) == 8
  np.testing.assert_array_equal(np.asarray(multi["tokens"])[:, :6], prompt)


@pytest.mark.parametrize("kwargs,message", [
    (dict(gen_length=30, block_length=8), "gen_length=30 is not a multiple of block_length=8"),
    (dict(gen_length=32, block_length=8, steps=6), "steps=6 is not a multiple of the number of blocks"),
    (dict(remasking="lowest"), "remasking must be one of"),
    (dict(threshold=1.5), "threshold must be None or in (0, 1)"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(threshold=0.9, remasking="random"), "threshold decoding compares model confidences"),
])
def test_bad_settings_are_named(kwargs, message):
  with pytest.raises(ValueError) as e:
    st.TextSampling(**kwargs)
  assert message in str(e.value)


def test_bad_inputs_are_named(tiny):
  model, params, config = tiny
  s = st.TextSampling(gen_length=8, block_length=8, steps=2)
  with pytest.raises(ValueError, match="prompt_mask has shape"):
    st.generate(model, params, jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4)), mask_id=230, settings=s)
  with pytest.raises(ValueError, match="prompt must be an integer array"):
    st.generate(model, params, jnp.zeros((5,), jnp.int32), mask_id=230, settings=s)


def test_settings_from_config():
  from mmada_jax import config as config_lib

  c = config_lib.get_base_config()
  s = st.TextSampling.from_config(c.sampling.text)
  assert (s.gen_length, s.block_length, s.steps, s.threshold, s.stop_token) == (512, 128, 256, None, None)
  c.sampling.text.stop_at_eot = True
  assert st.TextSampling.from_config(c.sampling.text, eot_id=c.vocab.eot_id).stop_token == 126348
  with pytest.raises(ValueError, match="pass eot_id"):
    st.TextSampling.from_config(c.sampling.text)


def _run_module(parity: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, MMADA_PARITY_DIR=parity)
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k",
                         "test_parity or test_sets_exist", os.path.join(HERE, "test_sampling_text.py")], env=env,
                        capture_output=True, text=True, cwd=HERE)


def test_other_fixture_sets(tmp_path):
  """Sets of other sizes, lengths, steps and guidance, with and without an index JSON, found through the env var."""
  sr.write_other_sets(tmp_path)
  res = _run_module(str(tmp_path))
  assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
  for test_id in ("text_generate_G-s1_block6_steps6", "text_generate_G-s2_leftpad2_block12_steps5",
                  "text_generate_G-s3_cfg2.5_block8_steps4", "text_generate_H-s1_cfg1_block4_steps6"):
    assert f"PASSED test_sampling_text.py::test_parity[{test_id}]" in res.stdout, res.stdout[-3000:]
  assert "text_generate_A" not in res.stdout


def test_empty_parity_dir_fails(tmp_path):
  res = _run_module(str(tmp_path))
  assert res.returncode != 0 and f"no {KIND}_<C>*.npz fixture set found" in res.stdout


def test_bench_command(capsys):
  from mmada_jax import config as config_lib
  from mmada_jax.cli import sample as sample_cmd

  tiny_config = os.path.join(os.path.dirname(HERE), "experiments", "tiny.py")
  args = ["bench", "--config", tiny_config, "--batch", "2", "--prompt_len", "4", "--gen_length", "8", "--block_length",
          "4", "--steps", "4", "--repeats", "1", "--variants", "exact"]
  assert sample_cmd.main(args) == 0
  out = capsys.readouterr().out
  assert "batch   2" in out and "4 model calls" in out and "tokens/s" in out and "forward passes/s" in out
  with pytest.raises(config_lib.ConfigError, match="unknown variant 'fast'"):
    sample_cmd.main(args[:-1] + ["fast"])
