"""Configuration: the base config (every key that code reads, with its default), its validation, and loading.

Experiment files in `experiments/` start from `get_base_config()` and change values; they never add keys (the config is
locked). `validate(config)` checks the whole config before anything is built and raises `ConfigError` naming the keys at
fault. `load_config(FILE[:arg], overrides)` loads an experiment file, applies `--config.key=value` overrides, validates
and locks.

Modules:
  errors      ConfigError
  defaults    the `*_section()` builders, `get_base_config()` and the value sets (DTYPES, REMAT_POLICIES, ...)
  validation  `validate` and its per-section checks; derived facts `head_dim`, `row_lengths`
  loading     experiment files and command-line overrides
"""

from mmada_jax.config.defaults import (
  ATTENTION_IMPLS,
  DTYPES,
  MATMUL_PRECISIONS,
  REMAT_POLICIES,
  ConfigDict,
  checkpoint_section,
  data_section,
  get_base_config,
  loss_section,
  magvit_section,
  model_section,
  optimizer_section,
  rl_section,
  sampling_section,
  sharding_section,
  train_section,
  vocab_section,
)
from mmada_jax.config.errors import ConfigError
from mmada_jax.config.loading import (
  apply_overrides,
  load_config,
  load_config_file,
  load_module,
  parse_override_value,
)
from mmada_jax.config.validation import (
  DATA_SOURCE_KINDS,
  RL_CHOICES,
  SPECIAL_ID_KEYS,
  head_dim,
  row_lengths,
  validate,
)

__all__ = [
  "ATTENTION_IMPLS", "DTYPES", "MATMUL_PRECISIONS", "REMAT_POLICIES", "ConfigDict", "checkpoint_section",
  "data_section", "get_base_config", "loss_section", "magvit_section", "model_section", "optimizer_section",
  "rl_section", "sampling_section", "sharding_section", "train_section", "vocab_section", "ConfigError",
  "apply_overrides", "load_config", "load_config_file", "load_module", "parse_override_value",
  "DATA_SOURCE_KINDS", "RL_CHOICES", "SPECIAL_ID_KEYS", "head_dim", "row_lengths", "validate",
]
