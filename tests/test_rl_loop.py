"""The UniGRPO loop on a tiny ToyWorld model: two RL steps through `mmada-jax rl` (`cli/rl.py`), checkpoints, metrics
and sample dumps; a second run started from the first one's reference with `--init_from`, stopped after one step and
resumed, ends bit-identical (policy, optimiser, prompt iterator); held-out evaluation; d1 variant config."""

import json
import os

import jax
import numpy as np
import pytest

from mmada_jax import config as config_lib
from mmada_jax.cli import rl as rl_cli
from mmada_jax.rl import (evaluate as rl_eval, loop, programs as rl_programs, prompts as rl_prompts,
                           rollout as rl_rollout, setup as rl_setup)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = os.path.join(ROOT, "experiments", "toyworld_rl.py")
SMALL = {"model.num_layers": "1", "model.d_model": "32", "model.num_heads": "2", "model.num_kv_heads": "2",
         "model.mlp_hidden": "64", "rl.prompts_per_step": "2", "rl.group_size": "4", "rl.inner_steps": "2",
         "rl.rollout_steps": "8", "rl.dump_every": "1", "rl.dump_count": "2", "rl.eval_prompts": "8",
         "checkpoint.async_save": "false", "checkpoint.save_every_steps": "1", "optimizer.warmup_steps": "0",
         "optimizer.learning_rate": "1e-3"}


@pytest.fixture(scope="module")
def cache():
  """One ProgramCache for the runs of this module: runs of the same model and settings compile their programs once."""
  return rl_programs.ProgramCache()


def read_metrics(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_two_steps_checkpoint_resume_and_init_from(tmp_path, capsys, cache):
  a = str(tmp_path / "a")
  args = ["--config", f"{RL}:text", "--workdir", a, "--no_progress"] + [f"--config.{k}={v}" for k, v in SMALL.items()]
  assert rl_cli.main(args + ["--config.rl.steps=2"], cache=cache) == 0
  assert "final metrics:" in capsys.readouterr().out
  rows = read_metrics(a)
  train_rows = [r for r in rows if "reward_total" in r]
  assert [r["step"] for r in train_rows] == [1, 2]
  for r in train_rows:
    for k in ("reward_correctness", "reward_format", "accuracy", "clip_frac", "ratio_mean", "kl", "mask_ratio",
              "zero_std_frac", "rollout_s", "update_s", "grad_norm"):
      assert np.isfinite(r[k]), k
    assert abs(r["ratio_first_iter"] - 1) < 1e-5  # θ = θ_old at the first inner iteration
  assert train_rows[-1]["optimizer_step"] == 4  # 2 RL steps × μ = 2
  evals = [r for r in rows if "eval_accuracy" in r]
  assert [r["step"] for r in evals] == [0, 2]
  dumps = [json.loads(line) for line in open(os.path.join(a, "samples.jsonl"))]
  assert len(dumps) == 4 and {"response", "answer", "correctness", "format", "advantage"} <= set(dumps[0])
  assert sorted(os.listdir(os.path.join(a, "checkpoints"))) == ["1", "2"]
  assert os.path.isdir(os.path.join(a, "reference"))

  # Same starting weights through --init_from; stop after 1 step, resume to 2: identical to the run above.
  b = str(tmp_path / "b")
  over = {**SMALL, "rl.eval_prompts": "0", "train.init_from": os.path.join(a, "reference")}
  run = loop.setup(config_lib.load_config(f"{RL}:text", {**over, "rl.steps": "1"}), b, log=lambda s: None, cache=cache)
  loop.train(run, log=lambda s: None, progress=False)
  assert not os.path.exists(os.path.join(b, "reference"))  # the handle is the init_from checkpoint
  resumed = loop.setup(config_lib.load_config(f"{RL}:text", {**over, "rl.steps": "2"}), b, log=lambda s: None,
                       cache=cache)
  assert resumed.rl_step == 1 and resumed.prompts.get_state() == {"position": 2}
  assert resumed.ref_handle == os.path.join(a, "reference")
  loop.train(resumed, log=lambda s: None, progress=False)
  final_a = loop.setup(config_lib.load_config(f"{RL}:text", {**over, "rl.steps": "2"}), a, log=lambda s: None,
                       cache=cache)
  assert final_a.rl_step == 2 and final_a.prompts.get_state() == resumed.prompts.get_state()
  same = lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  jax.tree.map(same, jax.device_get(final_a.state.params), jax.device_get(resumed.state.params))
  jax.tree.map(same, jax.device_get(final_a.state.opt_state), jax.device_get(resumed.state.opt_state))
  rows_b = {r["step"]: r for r in read_metrics(b)}
  assert rows_b[2]["reward_total"] == train_rows[1]["reward_total"] and rows_b[2]["loss"] == train_rows[1]["loss"]

  # --init_from another run's workdir (e.g. the demo's Mix-CoT run): its latest parameters start the policy and are
  # copied as the reference (that run may move on).
  c = str(tmp_path / "c")
  from_run = loop.setup(config_lib.load_config(f"{RL}:text", {**over, "train.init_from": a}), c, log=lambda s: None,
                        cache=cache)
  assert from_run.rl_step == 0 and from_run.ref_handle == os.path.join(c, "reference")
  jax.tree.map(same, jax.device_get(from_run.state.params), jax.device_get(final_a.state.params))
  jax.tree.map(same, jax.device_get(from_run.ref_params), jax.device_get(final_a.state.params))


def test_sampled_evaluation(tmp_path, cache):
  """`rl.eval_samples` = k adds eval_sampled_* scores: each held-out prompt answered k times at the rollout
  temperature (distinct draws); at temperature 0 they are the greedy answers; k = 0 adds nothing."""
  over = {**SMALL, "rl.eval_prompts": "3", "rl.eval_samples": "2"}
  for temperature in ("1.0", "0.0"):
    run = loop.setup(config_lib.load_config(f"{RL}:text", {**over, "rl.temperature": temperature}),
                     str(tmp_path / temperature), log=lambda s: None, cache=cache)
    seen, real = [], run.rewards
    run.rewards = lambda samples: (seen.append([(s["id"], s["response"]) for s in samples]), real(samples))[1]
    scores = rl_eval.evaluate(run, 3)
    names = {"correctness", "format", "total", "accuracy", "accuracy_se"}
    assert set(scores) == {f"eval_{n}" for n in names} | {f"eval_sampled_{n}" for n in names}, sorted(scores)
    assert all(np.isfinite(v) for v in scores.values())
    assert len(seen) == 2 and all(len(batch) == 8 for batch in seen)  # one rollout batch each (static shape)
    greedy = dict(seen[0][:3])
    sampled = seen[1][:6]
    ids = [i for i, _ in sampled]
    assert ids == [i for i in greedy for _ in range(2)]  # each prompt k times, in order
    if temperature == "0.0":
      assert all(text == greedy[i] for i, text in sampled)
    else:
      assert any(sampled[2 * j][1] != sampled[2 * j + 1][1] for j in range(3))
  run.config.rl.eval_samples = 0
  assert not any(k.startswith("eval_sampled") for k in rl_eval.evaluate(run, 1))


def test_experiment_variants_load():
  text = config_lib.load_config(f"{RL}:text")
  d1 = config_lib.load_config(f"{RL}:text_d1")
  assert text.rl.estimator == "unigrpo" and text.rl.schedule == "algorithm1" and text.rl.normalisation == "sample"
  assert d1.rl.estimator == "d1" and d1.rl.normalisation == "token" and not d1.rl.adv_std
  cot = config_lib.load_config(os.path.join(ROOT, "experiments", "toyworld.py:cot"))
  assert (text.model.d_model, text.model.num_layers) == (cot.model.d_model, cot.model.num_layers)


def test_t2i_task(tmp_path, cache):
  """UniGRPO on drawing prompts with a tiny random backbone and MAGVIT: two RL steps with finite metrics and ratio 1
  at the first inner iteration, image rewards, the held-out checker score, a PNG of the dumped images; the t2i row is
  the sampler's layout and only its image tokens are maskable; bad settings are named."""
  from mmada_jax.models import magvit
  from mmada_jax.tokens import prompting
  from mmada_jax.train import magvit as magvit_train
  from test_sample_cli import OVERRIDES as IMAGE

  image = {k: v for k, v in IMAGE.items() if k.startswith(("magvit.", "vocab.", "data.toyworld"))}
  over = {**SMALL, **image, "sampling.image.timesteps": "2", "rl.eval_prompts": "4", "rl.eval_samples": "2",
          "rl.eval_at_start": "false", "data.image_tokenizer": str(tmp_path / "magvit")}
  config = config_lib.load_config(f"{RL}:t2i", over)
  cfg = magvit.MagvitConfig.from_config(config.magvit)
  magvit_train.save_trained_params(str(tmp_path / "magvit"), magvit.init_params(cfg, 0), cfg, 0)
  work = str(tmp_path / "t2i")
  args = ["--config", f"{RL}:t2i", "--workdir", work, "--no_progress", "--config.rl.steps=2"]
  assert rl_cli.main(args + [f"--config.{k}={v}" for k, v in over.items()], cache=cache) == 0
  rows = read_metrics(work)
  train_rows = [r for r in rows if "reward_total" in r]
  assert [r["step"] for r in train_rows] == [1, 2]
  for r in train_rows:
    for k in ("reward_t2i_checker", "reward_t2i_attributes", "accuracy", "clip_frac", "kl", "mask_ratio", "grad_norm"):
      assert np.isfinite(r[k]), k
    assert abs(r["ratio_first_iter"] - 1) < 1e-5
    assert r["response_len"] == 64 and r["truncated_frac"] == 0
  evals = [r for r in rows if "eval_t2i_checker" in r]
  assert [r["step"] for r in evals] == [2]  # rl.eval_at_start = false: the end only
  for r in evals:  # rl.eval_samples = 2: two more images per held-out prompt, other keys
    for k in ("eval_sampled_t2i_checker", "eval_sampled_accuracy", "eval_accuracy_se", "eval_sampled_accuracy_se"):
      assert np.isfinite(r[k]) and r[k] >= 0, k
  dumps = [json.loads(line) for line in open(os.path.join(work, "samples.jsonl"))]
  assert len(dumps) == 4 and {"prompt", "t2i_checker", "t2i_attributes", "advantage"} <= set(dumps[0])
  assert os.path.exists(os.path.join(work, "samples", "rl_step_2.png"))

  run = loop.setup(config, str(tmp_path / "direct"), log=lambda s: None)
  assert rl_setup.dims(config) == (config.data.max_text_len + 2, 65) and run.settings.logp.vocab_slice == (
      config.vocab.image_offset, config.vocab.image_offset + config.vocab.codebook_size)
  records = run.prompts.next(2)
  roll = rl_rollout.rollout(run, records, jax.random.key(0))
  for i, rec in enumerate(records):  # the prompt part is the sampler's layout up to and including <|soi|>
    want = prompting.Prompter.from_config(config).t2i_gen(rec["prompt_ids"])
    np.testing.assert_array_equal(roll["ids"][i], want["input_ids"][:-65])
    np.testing.assert_array_equal(roll["mask"][i], want["valid_mask"][:-65])
  assert (roll["ids"][:, -1] == run.vocab.soi_id).all() and (roll["response"][:, -1] == run.vocab.eoi_id).all()
  codes = roll["response"][:, :-1] - run.vocab.image_offset
  assert codes.min() >= 0 and codes.max() < run.vocab.codebook_size
  batch = rl_rollout.build_batch(config, roll, {"adv": np.zeros(2, np.float32), "row_weight": np.ones(2, np.float32)},
                                 0, jax.random.key(1))
  assert batch["maskable"][:, :-1].all() and not batch["maskable"][:, -1].any()

  for bad, message in (({"data.image_tokenizer": ""}, "set data.image_tokenizer"),
                       ({"rl.rewards": "correctness,format"}, "are text rewards")):
    with pytest.raises(config_lib.ConfigError, match=message):
      loop.setup(config_lib.load_config(f"{RL}:t2i", {**over, **bad}), str(tmp_path / "bad"), log=lambda s: None)


def test_select_groups():
  zero = np.array([True, False, True, False, True, True])
  np.testing.assert_array_equal(rl_rollout.select_groups(zero, 2), [1, 3])  # the groups with signal
  np.testing.assert_array_equal(rl_rollout.select_groups(zero, 3), [0, 1, 3])  # filled with the first zero-std group
  np.testing.assert_array_equal(rl_rollout.select_groups(np.ones(4, bool), 2), [0, 1])
  with pytest.raises(ValueError, match="at least 3 groups"):
    rl_rollout.select_groups(zero[:2], 3)


def test_oversampled_step_trains_on_groups_with_signal(tmp_path, cache):
  """`rl.oversample` = 2: 2·Q prompts are rolled out per step, the Q groups whose rewards differ are trained on (seen
  in the sample dump, which lists the trained rows), reward metrics cover all rollouts; the prompt iterator advances
  2·Q."""
  q, g = 2, 4
  over = {**SMALL, "rl.eval_prompts": "0", "rl.oversample": "2", "rl.dump_count": str(q * g)}
  run = loop.setup(config_lib.load_config(f"{RL}:text", over), str(tmp_path / "o"), log=lambda s: None, cache=cache)
  drawn = [r["id"] for r in rl_prompts.ToyWorldPrompts(run.config, run.tokenizer).next(2 * q)]
  signal = set(drawn[1::2])  # the second and the fourth prompt: one from each rollout batch
  seen = []

  class Rewards:  # the real components, but only the `signal` prompts get differing totals
    names, real = run.rewards.names, run.rewards

    def __call__(self, samples):
      out = self.real(samples)
      seen.extend(s["id"] for s in samples)
      out["total"] = np.array([float(i % 2) if s["id"] in signal else 1.0 for i, s in enumerate(samples)], np.float32)
      return out

  run.rewards = Rewards()
  metrics, dumps = loop.rl_step(run, log=lambda s: None)
  assert seen == [i for i in drawn for _ in range(g)]  # both rollout batches, group-major
  assert [d["id"] for d in dumps] == [i for i in drawn if i in signal for _ in range(g)]
  assert all(abs(d["advantage"]) == 1.0 for d in dumps)  # ±1 after the std normalisation
  assert metrics["zero_std_frac"] == 0.5 and metrics["kept_zero_std_frac"] == 0.0
  assert run.prompts.get_state() == {"position": 2 * q}
  assert np.isfinite(metrics["loss"]) and metrics["optimizer_step"] == 2


@pytest.mark.parametrize("by", ["total", "accuracy"])
def test_oversample_by_accuracy(tmp_path, by, cache):
  """`rl.oversample_by=accuracy` (DAPO's filter): every group's totals differ (as partial attribute scores make them in
  t2i), but only the groups whose accuracy differs are kept; with "total" the first Q groups in draw order are."""
  q, g = 2, 4
  over = {**SMALL, "rl.eval_prompts": "0", "rl.oversample": "2", "rl.oversample_by": by, "rl.dump_count": str(q * g)}
  run = loop.setup(config_lib.load_config(f"{RL}:text", over), str(tmp_path / by), log=lambda s: None, cache=cache)
  drawn = [r["id"] for r in rl_prompts.ToyWorldPrompts(run.config, run.tokenizer).next(2 * q)]
  signal = set(drawn[1::2])

  class Rewards:
    names, real = run.rewards.names, run.rewards

    def __call__(self, samples):
      out = self.real(samples)
      out["total"] = np.arange(len(samples), dtype=np.float32) % 3
      out["accuracy"] = np.array([float(i % 2) if s["id"] in signal else 0.0 for i, s in enumerate(samples)],
                                 np.float32)
      return out

  run.rewards = Rewards()
  metrics, dumps = loop.rl_step(run, log=lambda s: None)
  kept = drawn[:q] if by == "total" else [i for i in drawn if i in signal]
  assert [d["id"] for d in dumps] == [i for i in kept for _ in range(g)]
  assert metrics["kept_zero_std_frac"] == 0.0 and metrics["kept_by_spread_frac"] == 1.0


def test_evaluation_summary_standard_error():
  """eval_* are means over every answer; the accuracy's standard error is taken over the prompts, each the mean of
  its k consecutive answers."""
  scores = {"accuracy": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0], "total": [2.0, 0.0, 2.0, 2.0, 0.0, 0.0]}
  one = rl_eval.summary(scores, "eval", 1)
  assert one["eval_accuracy"] == 0.5 and one["eval_total"] == 1.0
  np.testing.assert_allclose(one["eval_accuracy_se"], np.std([1, 0, 1, 1, 0, 0], ddof=1) / np.sqrt(6))
  three = rl_eval.summary(scores, "eval_sampled", 3)  # two prompts: means 2/3 and 1/3
  np.testing.assert_allclose(three["eval_sampled_accuracy_se"], np.std([2 / 3, 1 / 3], ddof=1) / np.sqrt(2))
  assert rl_eval.summary({"accuracy": [1.0]}, "eval", 1)["eval_accuracy_se"] == 0.0
