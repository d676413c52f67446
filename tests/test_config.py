"""Configs: every experiment file loads and validates; overrides are typed; bad values are named."""

import glob
import os

import pytest

from mmada_jax import config as config_lib
from mmada_jax.cli import common as cli_common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def test_experiments_found():
  assert len(EXPERIMENTS) >= 4


def _variants():
  """Every `file:variant` an experiment file declares in its VARIANTS tuple."""
  out = []
  for path in EXPERIMENTS:
    module = config_lib.load_module(path)
    out += [f"{path}:{v}" for v in getattr(module, "VARIANTS", ())]
  return out


VARIANTS = _variants()


@pytest.mark.parametrize("spec", VARIANTS, ids=[os.path.basename(v).replace(".py:", ":") for v in VARIANTS])
def test_experiment_variant_loads_and_validates(spec):
  config = config_lib.load_config(spec)
  assert config.name


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[os.path.basename(p)[:-3] for p in EXPERIMENTS])
def test_experiment_loads_and_validates(path):
  config = config_lib.load_config(path)
  assert config.model.vocab_size > 0
  with pytest.raises(Exception):  # locked: typos cannot add keys
    config.model.num_layer = 3


def test_mmada_8b_official_facts():
  c = config_lib.load_config(os.path.join(ROOT, "experiments", "mmada_8b.py"))
  m, v = c.model, c.vocab
  assert (m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.mlp_hidden) == (32, 4096, 32, 32, 12288)
  assert m.vocab_size == 134656 and m.rope_theta == 500000.0 and m.norm_eps == 1e-5
  assert (v.mask_id, v.image_offset, v.codebook_size) == (126336, 126349, 8192)
  assert (v.soi_id, v.eoi_id, v.t2i_id, v.mmu_id, v.ipad_id) == (126084, 126085, 126088, 126089, 126093)
  assert (v.bos_id, v.eos_id, v.eot_id) == (126080, 126081, 126348)
  c512 = config_lib.load_config(os.path.join(ROOT, "experiments", "mmada_8b.py:512"))
  assert c512.vocab.num_image_tokens == 1024 and c512.magvit.resolution == 512


def test_overrides_are_typed():
  path = os.path.join(ROOT, "experiments", "tiny.py")
  c = config_lib.load_config(path, {"model.num_layers": "4", "model.scan_layers": "false", "model.rope_theta": "1e4",
                                    "magvit.encoder_channel_mult": "(1,2,2)", "sharding.rule_overrides.embed": ""})
  assert c.model.num_layers == 4 and c.model.scan_layers is False and c.model.rope_theta == 10000.0
  assert c.magvit.encoder_channel_mult == (1, 2, 2)
  assert c.sharding.rule_overrides.embed == ""


def test_split_config_args():
  path, overrides, rest = cli_common.split_config_args(
      ["--config", "x.py", "--config.model.num_layers=4", "--config.model.dtype", "bfloat16", "a", "--flag"])
  assert path == "x.py" and overrides == {"model.num_layers": "4", "model.dtype": "bfloat16"}
  assert rest == ["a", "--flag"]


@pytest.mark.parametrize("key,value,message", [
    ("model.num_heads", "5", "model.d_model: 64 is not divisible by model.num_heads=5"),
    ("model.dtype", "float8", "model.dtype: must be one of"),
    ("model.remat_policy", "sometimes", "model.remat_policy"),
    ("vocab.mask_id", "999", "vocab.mask_id: 999 is not a text id"),
    ("vocab.image_offset", "250", "beyond the model.vocab_size=300 rows"),
    ("sharding.preset", "zero9", "unknown preset 'zero9'"),
    ("sharding.rule_overrides.embed", "fsdp,model", "unknown mesh axes ['model']"),
    ("sharding.rule_overrides.emb", "fsdp", "sharding.rule_overrides.emb: unknown logical axis"),
    ("magvit.codebook_bits", "7", "magvit.codebook_bits: 2**7 codes != vocab.codebook_size=64"),
])
def test_bad_values_are_named(key, value, message):
  with pytest.raises(config_lib.ConfigError, match=None) as e:
    config_lib.load_config(os.path.join(ROOT, "experiments", "tiny.py"), {key: value})
  assert message in str(e.value)


def test_unknown_override_key_is_named():
  with pytest.raises(config_lib.ConfigError, match="no such key 'num_layer'"):
    config_lib.load_config(os.path.join(ROOT, "experiments", "tiny.py"), {"model.num_layer": "4"})
  with pytest.raises(config_lib.ConfigError, match="expected a boolean"):
    config_lib.load_config(os.path.join(ROOT, "experiments", "tiny.py"), {"model.scan_layers": "maybe"})
