"""Impossible configurations fail before anything is compiled, with a message naming the keys at fault.

Each case runs the real entry (config loading + `train.loop.setup` / `rl.loop.setup`) with `jax.jit` replaced by a
function that fails the test, and with a listener that fails on any XLA backend compilation."""

import os

import jax
import pytest

from mmada_jax import config as config_lib
from mmada_jax.diffusion.losses import Objective
from mmada_jax.parallel import mesh as mesh_lib, rules as rules_lib
from mmada_jax.rl import loop as rl_loop
from mmada_jax.train import data_setup, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "experiments", "toyworld.py:text")
TOY_ALL = os.path.join(ROOT, "experiments", "toyworld.py:stage1")
TINY = os.path.join(ROOT, "experiments", "tiny.py")
RL = os.path.join(ROOT, "experiments", "toyworld_rl.py:text")
BROKEN_PRESET = {"ici": {"data": 1, "fsdp": -1, "tensor": 1, "model": 1}, "dcn": {"data": -1, "fsdp": 1, "tensor": 1},
                 "rules": {"embed": ("model",), "colour": ("fsdp",)}}

CASES = {  # name: (config file, overrides, entry, error type, fragments the message must contain)
    "mesh_more_devices_than_available": (TOY, {"sharding.ici.fsdp": "16"}, "train", mesh_lib.MeshError,
                                         ["sharding.ici", "use 16 devices but 8 are available"]),
    "mesh_axis_sizes_do_not_divide": (TOY, {"sharding.ici.tensor": "3"}, "train", mesh_lib.MeshError,
                                      ["sharding.ici", "8 devices cannot be split"]),
    "batch_not_divisible_by_data_axes": (TOY, {"data.batch_size_lm": "6"}, "train", config_lib.ConfigError,
                                         ["data.batch_size_lm: 6 rows cannot be split over the 8 batch shards",
                                          "sharding.preset='fsdp'"]),
    "batch_not_divisible_under_dp": (TOY, {"data.batch_size_lm": "4", "sharding.preset": "dp"}, "train",
                                     config_lib.ConfigError, ["data.batch_size_lm: 4 rows", "8 batch shards of mesh "
                                                              "axes ['data']"]),
    "rl_rows_not_divisible_by_data_axes": (RL, {"rl.prompts_per_step": "3", "rl.group_size": "2"}, "rl", ValueError,
                                           ["rl.prompts_per_step * rl.group_size", "multiple of 8"]),
    "micro_batches_do_not_split_batch": (TOY, {"train.micro_batches": "3"}, "load", config_lib.ConfigError,
                                         ["data.batch_size_lm", "train.micro_batches=3"]),
    "image_tokens_do_not_fit_layout": (TOY_ALL, {"data.image_tokenizer": "/nonexistent/magvit",
                                                 "vocab.num_image_tokens": "100"}, "load", config_lib.ConfigError,
                                       ["vocab.num_image_tokens: 100 image positions", "data.image_tokenizer",
                                        "magvit.resolution"]),
    "rl_generation_blocks": (RL, {"rl.gen_length": "20", "rl.block_length": "8"}, "load", config_lib.ConfigError,
                             ["rl.block_length", "rl.gen_length=20"]),
    "rl_oversample": (RL, {"rl.oversample": "0"}, "load", config_lib.ConfigError,
                      ["rl.oversample: must be an integer >= 1, got 0"]),
    "rl_oversample_by": (RL, {"rl.oversample_by": "checker"}, "load", config_lib.ConfigError,
                         ["rl.oversample_by: must be one of", "'accuracy', 'correctness'", "got 'checker'"]),
    "sampler_blocks": (TINY, {"sampling.text.gen_length": "100", "sampling.text.block_length": "32"}, "load",
                       config_lib.ConfigError, ["sampling.text.block_length"]),
    "eval_text_blocks": (TINY, {"sampling.eval_text.gen_length": "24", "sampling.eval_text.steps": "-1"}, "load",
                         config_lib.ConfigError, ["sampling.eval_text.steps: must be an integer >= 0",
                                                  "sampling.eval_text.block_length"]),
    "image_ids_overlap_text_ids": (TINY, {"vocab.image_offset": "200"}, "load", config_lib.ConfigError,
                                   ["vocab.image_offset", "overlap the text ids"]),
    "codebook_beyond_vocabulary": (TINY, {"vocab.codebook_size": "128", "magvit.codebook_bits": "7"}, "load",
                                   config_lib.ConfigError, ["vocab.image_offset + vocab.codebook_size = 364",
                                                            "model.vocab_size=300"]),
    "codebook_vs_tokenizer_bits": (TINY, {"magvit.codebook_bits": "5"}, "load", config_lib.ConfigError,
                                   ["magvit.codebook_bits", "vocab.codebook_size=64"]),
    "preset_names_unknown_axes": (TINY, {"sharding.preset": "broken"}, "load", config_lib.ConfigError,
                                  ["preset 'broken' maps 'embed' to unknown mesh axes ['model']",
                                   "unknown logical axis 'colour'", "ici sizes to unknown mesh axes ['model']"]),
    "override_names_unknown_axes": (TINY, {"sharding.rule_overrides.activation_batch": "data,pipeline"}, "load",
                                    config_lib.ConfigError, ["sharding.rule_overrides.activation_batch",
                                                             "unknown mesh axes ['pipeline']"]),
}


@pytest.fixture
def no_compilation(monkeypatch):
  compiled = []

  def listener(event, duration, **kwargs):
    if "backend_compile" in event:
      compiled.append(event)

  def jit(*args, **kwargs):
    raise AssertionError("jax.jit was called before the configuration error was raised")

  monkeypatch.setattr(jax, "jit", jit)
  monkeypatch.setitem(rules_lib.PRESETS, "broken", BROKEN_PRESET)
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield compiled
  jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("name", sorted(CASES))
def test_impossible_config_fails_before_compiling(name, tmp_path, no_compilation):
  path, overrides, entry, error, fragments = CASES[name]
  with pytest.raises(error) as e:
    config = config_lib.load_config(path, overrides)
    if entry == "train":
      loop.setup(config, str(tmp_path), Objective, data_setup.make_data, log=lambda s: None)
    elif entry == "rl":
      rl_loop.setup(config, str(tmp_path), log=lambda s: None)
  for fragment in fragments:
    assert fragment in str(e.value), f"{name}: {fragment!r} not in {str(e.value)!r}"
  assert no_compilation == [], f"{name}: compiled before failing"
  assert entry == "load" or not os.path.exists(tmp_path / "checkpoints"), name  # nothing written either
