"""The training loop: resume bit for bit, restore under another sharding preset, --init_from, metrics files."""

import json
import os

import jax
import numpy as np
import pytest

from mmada_jax import checkpoint as ckpt, cli, config as config_lib
from mmada_jax.diffusion.losses import Objective
from mmada_jax.train import data_setup, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "experiments", "toyworld.py:text")
SMALL = {"model.num_layers": "1", "model.d_model": "32", "model.num_heads": "2", "model.num_kv_heads": "2",
         "model.mlp_hidden": "64", "data.batch_size_lm": "8", "data.max_text_len": "24", "train.log_every": "1",
         "checkpoint.save_every_steps": "2", "checkpoint.async_save": "false", "train.tensorboard": "false",
         "train.eval_batches": "1"}


def make_run(workdir, steps, **extra):
  config = config_lib.load_config(TOY, {**SMALL, "train.steps": str(steps), **extra})
  return loop.setup(config, str(workdir), Objective, data_setup.make_data, log=lambda s: None)


def params_of(run):
  return jax.device_get(run.state.params)


def test_resume_equals_uninterrupted(tmp_path):
  full = make_run(tmp_path / "full", 4)
  loop.train(full, log=lambda s: None, progress=False)
  part = make_run(tmp_path / "part", 2)
  loop.train(part, log=lambda s: None, progress=False)
  resumed = make_run(tmp_path / "part", 4)  # same workdir, more steps: resumes at step 2
  assert int(resumed.state.step) == 2
  loop.train(resumed, log=lambda s: None, progress=False)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params_of(full), params_of(resumed))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(full.state.opt_state),
               jax.device_get(resumed.state.opt_state))
  read = lambda p: {r["step"]: r for r in map(json.loads, open(p / "metrics.jsonl")) if "loss" in r}
  a, b = read(tmp_path / "full"), read(tmp_path / "part")
  for step in (3, 4):
    assert a[step]["loss"] == b[step]["loss"] and a[step]["grad_norm"] == b[step]["grad_norm"]
  assert a[4]["loss"] < a[1]["loss"] * 1.5 and np.isfinite(a[4]["loss"])


def test_restore_under_another_preset(tmp_path):
  run = make_run(tmp_path / "w", 2)
  loop.train(run, log=lambda s: None, progress=False)
  saved = params_of(run)
  other = make_run(tmp_path / "w", 2, **{"sharding.preset": "dp"})
  assert int(other.state.step) == 2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), saved, params_of(other))
  wte = other.state.params["wte"]
  assert wte.addressable_shards[0].data.shape == wte.shape  # replicated under dp
  assert run.state.params["wte"].addressable_shards[0].data.shape != wte.shape  # was split under fsdp


def test_init_from_parameter_checkpoint(tmp_path):
  run = make_run(tmp_path / "a", 2)
  loop.train(run, log=lambda s: None, progress=False)
  meta = {"kind": "mmada_backbone", "layer_layout": "unstacked",
          "model": {k: run.config.model[k] for k in ("num_layers", "d_model", "num_heads", "vocab_size")}}
  ckpt.save_params(str(tmp_path / "params"), params_of(run), meta)
  fresh = make_run(tmp_path / "b", 1, **{"train.init_from": str(tmp_path / "params")})
  assert int(fresh.state.step) == 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params_of(run), params_of(fresh))
  with pytest.raises(ckpt.CheckpointError, match="model.d_model: checkpoint has 32, expected 64"):
    make_run(tmp_path / "c", 1, **{"train.init_from": str(tmp_path / "params"), "model.d_model": "64"})


def test_cli_train_writes_metrics_and_config(tmp_path, capsys):
  args = ["train", "--config", TOY, "--workdir", str(tmp_path / "cli"), "--no_progress"]
  args += [f"--config.{k}={v}" for k, v in {**SMALL, "train.steps": "2"}.items()]
  assert cli.main(args) == 0
  assert "final metrics:" in capsys.readouterr().out
  rows = [json.loads(line) for line in open(tmp_path / "cli" / "metrics.jsonl")]
  train_rows = [r for r in rows if "loss_lm" in r]
  assert [r["step"] for r in train_rows] == [1, 2] and all("tokens_per_s" in r for r in train_rows)
  evals = [r for r in rows if "eval_loss_lm" in r]
  assert [r["step"] for r in evals] == [0, 2] and all(np.isfinite(r["eval_loss_lm"]) for r in evals)
  assert json.load(open(tmp_path / "cli" / "config.json"))["model"]["d_model"] == 32


def test_generation_evals_and_sample_files_during_training(tmp_path):
  """`train.sample_every`: held-out generation accuracies in metrics.jsonl and WORKDIR/samples at those steps."""
  extra = {"train.sample_every": "2", "train.sample_count": "2", "sampling.text.gen_length": "8",
           "sampling.text.block_length": "8", "sampling.text.steps": "2"}
  run = make_run(tmp_path, 3, **extra)
  lines = []
  loop.train(run, log=lines.append, progress=False)
  rows = [json.loads(r) for r in open(tmp_path / "metrics.jsonl")]
  sampled = {r["step"]: r["sample_acc_text"] for r in rows if "sample_acc_text" in r}
  assert sorted(sampled) == [2, 3] and all(0.0 <= a <= 1.0 for a in sampled.values())  # every 2 steps and the end
  for step in (2, 3):
    with open(tmp_path / "samples" / f"step{step}.json") as f:
      result = json.load(f)
    assert result["checkpoint"] == {"source": "training", "step": step} and result["tasks"]["text"]["count"] == 2
    assert os.path.exists(tmp_path / "samples" / f"step{step}.md")
  assert any(line.startswith("step 2 samples: sample_acc_text=") for line in lines)
