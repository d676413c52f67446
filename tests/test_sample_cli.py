"""The inference library (`mmada_jax.inference`) and `mmada-jax sample text|t2i|mmu` end to end on a tiny random
backbone and a tiny random MAGVIT-v2 saved as checkpoints; the block-by-block text stream against the one-program
sampler; presets; errors a user can make."""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmada_jax import checkpoint as ckpt, cli, config as config_lib
from mmada_jax.cli import sample as sample_cmd
from mmada_jax.data.tokenizer import shared_tokenizer
from mmada_jax.diffusion import sampling_text as st
from mmada_jax.inference import InferenceError, loading, presets, sampler as sampler_lib
from mmada_jax.tokens import vocab as vocab_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "toyworld.py") + ":cot"
# A 1-layer backbone, a narrow MAGVIT with 8 x 8 codes per 64 px image and short samplers: every mode compiles in a
# second or two on CPU. The image tokenizer is pinned here so that the test does not follow the experiment's.
OVERRIDES = {"model.num_layers": "1", "model.d_model": "32", "model.num_heads": "2", "model.num_kv_heads": "2",
             "model.mlp_hidden": "64", "magvit.resolution": "64", "magvit.channels": "8", "magvit.norm_groups": "8",
             "magvit.encoder_channel_mult": "1,2,2,2", "magvit.encoder_num_res_blocks": "1,1,1,1",
             "magvit.decoder_channel_mult": "1,2,2,2", "magvit.decoder_num_res_blocks": "1,1,1,1",
             "vocab.num_image_tokens": "64", "data.toyworld.image_size": "64", "sampling.text.gen_length": "16",
             "sampling.text.block_length": "8", "sampling.text.steps": "4", "sampling.text.temperature": "1.0",
             "sampling.image.timesteps": "2"}


def config_args(**extra) -> list[str]:
  overrides = dict(OVERRIDES, **extra)
  return ["--config", CONFIG] + [f"--config.{k}={v}" for k, v in overrides.items()]


def load_config(**extra):
  return config_lib.load_config(CONFIG, dict(OVERRIDES, **extra))


def build_checkpoints(root) -> dict:
  """A parameter checkpoint, a training workdir (steps 3 and 7; step 7 holds the same parameters), a MAGVIT
  checkpoint and a ToyWorld test image, under `root`."""
  from mmada_jax.data import toyworld as tw
  from mmada_jax.models import llada, magvit
  from mmada_jax.train import magvit as magvit_train
  from mmada_jax.train import optim, state as state_lib

  config = load_config()
  model = llada.build_model(config.model)
  params = jax.device_get(llada.init_params(model, jax.random.key(0)))
  paths = {k: str(root / k) for k in ("params", "magvit", "workdir", "image.png")}
  ckpt.save_params(paths["params"], params, {"kind": "mmada_backbone", "layer_layout": "unstacked"})
  tx = optim.make_optimizer(config.optimizer)
  checkpointer = ckpt.TrainCheckpointer(os.path.join(paths["workdir"], "checkpoints"), config.checkpoint)
  other = jax.device_get(llada.init_params(model, jax.random.key(1)))
  for step, p in ((3, other), (7, params)):
    state = state_lib.TrainState(step=jnp.int32(step), params=p, opt_state=tx.init(p))
    checkpointer.save(step, state, {}, {"name": "test"}, force=True)
  checkpointer.wait()
  checkpointer.close()
  cfg = magvit.MagvitConfig.from_config(config.magvit)
  magvit_train.save_trained_params(paths["magvit"], magvit.init_params(cfg, 0), cfg, 0)
  Image.fromarray(tw.ToyWorld.from_config(config).example("test", 0)["image"]).save(paths["image.png"])
  return paths


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  return build_checkpoints(tmp_path_factory.mktemp("sample"))


def _sample(args: list[str], capsys) -> tuple[int, str, str]:
  rc = cli.main(["sample"] + args)
  out = capsys.readouterr()
  return rc, out.out, out.err


# ----------------------------------------------------------------------------------------------------------------------
# The modes, end to end


def test_text_streams_an_answer(ckpts, capsys):
  rc, out, err = _sample(["text", "--params", ckpts["params"], "--prompt", "Ada has 3 red circles and gets 2 more.",
                          "--think"] + config_args(), capsys)
  assert rc == 0, err
  assert f"parameters: {os.path.abspath(ckpts['params'])}" in err
  assert "(1 x 16 positions in" in out and "[final]" not in out  # the stream is the final answer
  # The same through the library, recording each write: one per block with new text, then the end of the line.
  writes = []
  recorder = type("Recorder", (), {"write": lambda self, t: writes.append(t), "flush": lambda self: None})()
  config = load_config()
  sampler = sampler_lib.Sampler.load(config, params=ckpts["params"], log=lambda m: None)
  texts = sample_cmd.run_text(sampler, ["Ada has 3 red circles and gets 2 more."], presets.text_settings(config),
                              config.seed, think=True, out=recorder)
  assert "".join(writes[:-1]) == texts[0] + "\n" and writes[-1].startswith("(1 x 16 positions")
  assert texts[0] and out.startswith(texts[0])


def test_workdir_latest_step_equals_the_same_params(ckpts, capsys):
  prompt = ["--prompt", "How many?", "--prompt", "Ada has 3 red circles and gets 2 more. How many?"]
  rc, from_params, err = _sample(["text", "--params", ckpts["params"]] + prompt + config_args(), capsys)
  assert rc == 0, err
  rc, from_workdir, err = _sample(["text", "--workdir", ckpts["workdir"]] + prompt + config_args(), capsys)
  assert rc == 0, err
  assert "(step 7)" in err
  answers = lambda out: [line for line in out.splitlines() if not line.startswith("(")]
  assert answers(from_workdir) == answers(from_params) and "[1] Ada has 3" in from_params
  rc, from_step3, err = _sample(["text", "--workdir", ckpts["workdir"], "--step", "3"] + prompt + config_args(), capsys)
  assert rc == 0 and "(step 3)" in err, err
  assert answers(from_step3) != answers(from_params)  # other weights


def test_t2i_writes_pngs_and_never_overwrites(ckpts, tmp_path, capsys):
  args = ["t2i", "--params", ckpts["params"], "--magvit", ckpts["magvit"], "--prompt", "two red circles",
          "--num_images", "2", "--out", str(tmp_path), "--preset", "demo", "--timesteps", "2"] + config_args()
  rc, _, err = _sample(args, capsys)
  assert rc == 0, err
  assert "2 steps, guidance 3.5" in err  # preset guidance, explicit --timesteps
  names = sorted(os.listdir(tmp_path))
  assert names == ["00_two-red-circles.png", "01_two-red-circles.png"]
  with Image.open(tmp_path / names[0]) as im:
    assert im.size == (64, 64) and im.mode == "RGB"
    assert np.asarray(im).dtype == np.uint8
  rc, _, err = _sample(args, capsys)
  assert rc == 0, err
  assert len(os.listdir(tmp_path)) == 4 and (tmp_path / "00_two-red-circles-1.png").exists()


def test_mmu_answers_questions_about_an_image_file(ckpts, capsys):
  rc, out, err = _sample(["mmu", "--params", ckpts["params"], "--magvit", ckpts["magvit"], "--image",
                          ckpts["image.png"], "--question", "How many objects are there?", "--question",
                          "Describe the image.", "--think"] + config_args(), capsys)
  assert rc == 0, err
  assert "image tokenizer:" in err
  lines = out.splitlines()
  assert lines[0] == "Q: How many objects are there?" and lines[1].startswith("A:")
  assert lines[2] == "Q: Describe the image." and lines[3].startswith("A:")


# ----------------------------------------------------------------------------------------------------------------------
# Library pieces


def test_stream_text_equals_generate():
  from mmada_jax.models import llada

  config = load_config()
  model = llada.build_model(config.model)
  params = llada.init_params(model, jax.random.key(0))
  mask_id, key = config.vocab.mask_id, jax.random.key(3)
  # Two left-padded rows, sampled tokens, guidance: every block of the stream is the one-program result so far.
  ids, mask = st.left_pad([[1, 2, 3, 4, 5], [6, 7]], pad_id=0)
  settings = st.TextSampling(gen_length=8, block_length=4, steps=4, temperature=1.0, cfg_scale=1.0)
  want = np.asarray(st.generate(model, params, ids, mask, mask_id=mask_id, settings=settings, rng=key)["tokens"])
  blocks = list(st.stream_text(model, params, ids, mask, mask_id=mask_id, settings=settings, rng=key))
  assert [b for b, _ in blocks] == [0, 1]
  np.testing.assert_array_equal(blocks[-1][1], want)
  np.testing.assert_array_equal(blocks[0][1][:, :5 + 4], want[:, :5 + 4])
  assert np.all(blocks[0][1][:, 5 + 4:] == mask_id)
  # Early stop: a stop token at the end of the first block ends both after one block.
  greedy = st.TextSampling(gen_length=8, block_length=4, steps=4)
  first = np.asarray(st.generate(model, params, ids[:1], mask_id=mask_id, settings=greedy)["tokens"])
  stopping = dataclasses.replace(greedy, stop_token=int(first[0, 5 + 4 - 1]))
  want = st.generate(model, params, ids[:1], mask_id=mask_id, settings=stopping)
  blocks = list(st.stream_text(model, params, ids[:1], mask_id=mask_id, settings=stopping))
  assert int(want["blocks"]) == len(blocks) == 1
  np.testing.assert_array_equal(blocks[-1][1], np.asarray(want["tokens"]))


def test_presets_and_precedence():
  config = load_config()
  demo = presets.text_settings(config, "demo")
  assert (demo.gen_length, demo.block_length, demo.steps, demo.temperature) == (512, 128, 256, 1.0)
  mine = presets.text_settings(config, "gsm8k", {"gen_length"}, block_length=8)
  assert (mine.gen_length, mine.block_length, mine.steps, mine.temperature) == (16, 8, 256, 0.0)
  image = presets.image_settings(config, "demo-50")
  assert (image.timesteps, image.guidance_scale, image.temperature_annealing) == (50, 3.5, "cumulative")
  assert presets.text_settings(config).gen_length == 16  # the config alone
  with pytest.raises(InferenceError, match=r"--preset 'fast': unknown text preset \(known: demo, "):
    presets.text_settings(config, "fast")
  with pytest.raises(InferenceError, match="not a multiple of block_length"):
    presets.text_settings(config, block_length=5)


def test_answer_stops_at_the_end_of_the_turn():
  config = load_config()
  v = vocab_lib.Vocab.from_config(config.vocab)
  sampler = sampler_lib.Sampler(config, None, None, shared_tokenizer(config), v, None)
  ids = sampler.tokenizer.encode("<think>2+3=5</think>5")
  assert sampler.answer(ids + [v.eot_id] + ids) == "<think>2+3=5</think>5"
  assert sampler.answer([v.mask_id] + ids + [v.mask_id, v.eos_id, v.mask_id]) == "<think>2+3=5</think>5"


# ----------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("case", ["missing_params", "both_sources", "no_source", "magvit_as_params", "wrong_shape",
                                  "missing_image", "empty_workdir", "missing_step", "no_image_tokenizer",
                                  "unknown_preset", "step_with_params"])
def test_errors_name_the_problem(ckpts, tmp_path, capsys, case):
  p, m = ckpts["params"], ckpts["magvit"]
  text = ["text", "--prompt", "hi"]
  args, extra, message = {
      "missing_params": (text + ["--params", str(tmp_path / "nope")], {}, "checkpoint not found"),
      "both_sources": (text + ["--params", p, "--workdir", ckpts["workdir"]], {}, "exactly one of --params"),
      "no_source": (text, {}, "exactly one of --params"),
      "magvit_as_params": (text + ["--params", m], {}, "a 'magvit' checkpoint.*pass it as --magvit"),
      "wrong_shape": (text + ["--params", p], {"model.d_model": "64"}, "does not fit the config's model"),
      "missing_image": (["mmu", "--params", p, "--magvit", m, "--image", str(tmp_path / "x.png"), "--question", "?"],
                        {}, "no such file"),
      "empty_workdir": (text + ["--workdir", str(tmp_path)], {}, "no training checkpoint"),
      "missing_step": (text + ["--workdir", ckpts["workdir"], "--step", "5"], {}, r"no checkpoint at step 5 .*3, 7"),
      "no_image_tokenizer": (["t2i", "--params", p, "--prompt", "x"], {}, "no image tokenizer"),
      "unknown_preset": (text + ["--params", p, "--preset", "fast"], {}, "unknown text preset"),
      "step_with_params": (text + ["--params", p, "--step", "3"], {}, "--step selects a checkpoint of --workdir"),
  }[case]
  rc, _, err = _sample(args + config_args(**extra), capsys)
  assert rc == 1
  assert err.startswith("mmada-jax sample: error:")
  assert re.search(message, err, re.S), err
  if case == "empty_workdir":
    assert os.listdir(tmp_path) == []  # nothing was created in the user's directory


def test_export_writes_the_runs_parameters(ckpts, tmp_path, capsys):
  """`mmada-jax export` of step 3 holds step 3's parameters (cast when asked), is read back by `--params`, and never
  replaces an existing directory."""
  out = str(tmp_path / "exported")
  assert cli.main(["export", "--workdir", ckpts["workdir"], "--step", "3", "--out", out, "--dtype", "bfloat16"]
                  + config_args()) == 0
  assert "(step 3)" in capsys.readouterr().out
  meta = ckpt.read_metadata(out)
  assert meta["kind"] == "mmada_backbone" and meta["step"] == 3 and meta["layer_layout"] == "unstacked"
  saved, _ = ckpt.load_params(out, as_numpy=True)
  config = load_config()
  want = jax.device_get(loading.load_backbone(config, workdir=ckpts["workdir"], step=3, log=lambda s: None)[1])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16))), saved,
               want)
  _, back, info = loading.load_backbone(config, params=out, log=lambda s: None)
  assert info["source"] == os.path.abspath(out) and jax.tree.leaves(back)[0].dtype == jnp.float32
  capsys.readouterr()
  assert cli.main(["export", "--workdir", ckpts["workdir"], "--out", out] + config_args()) != 0
  assert "already exists" in capsys.readouterr().err
