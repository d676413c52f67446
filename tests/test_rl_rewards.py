"""UniGRPO rewards on hand-made responses: correctness (answer extraction, truncation), <think> format, the ToyWorld
image checker, the CLIP-score arithmetic and the errors when reward weights are absent."""

import numpy as np
import pytest

from mmada_jax import config as config_lib
from mmada_jax.data import toyworld as tw
from mmada_jax.rl import rewards


def test_answer_extraction_and_correctness():
  assert rewards.extract_answer("<think>2+3=5</think>5") == "5"
  assert rewards.extract_answer("<think>a</think>x</think> 7 ") == "7"  # the last </think>
  assert rewards.extract_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
  assert rewards.extract_answer("no markers at all") == "no markers at all"
  samples = [
      {"response": "<think>20+1=21</think>21", "answer": "21"},
      {"response": "<think>20+1=21</think>22", "answer": "21"},
      {"response": "<think>20+1=21</think>21", "answer": "21", "truncated": True},  # truncated: 0
      {"response": "21", "answer": "21"},  # no think block: correct answer still counts
      {"response": "<think>x</think>\\boxed{21}", "answer": "21"},
      {"response": "<think>x</think>three", "answer": "3"},  # number words
      {"response": "<think>x</think>215", "answer": "21"},
  ]
  np.testing.assert_array_equal(rewards.correctness(samples), [1, 0, 0, 1, 1, 1, 0])
  gsm = [{"response": "<think>…</think>The answer is 1,234.", "answer": "#### 1234"},
         {"response": "<think>…</think>It is 12 or 13", "answer": "12"},
         {"response": "<think>…</think>\\boxed{\\frac{2}{4}}", "answer": "0.5"},
         {"response": "<think>…</think>1234", "answer": "1234", "truncated": True}]
  np.testing.assert_array_equal(rewards.correctness_math(gsm), [1, 0, 1, 0])


def test_think_format_soft_and_strict():
  cases = {"<think>2+3=5</think>5": (True, True), "<think></think>5": (True, False),
           "5 <think>late</think>": (True, False), "<think>a</think>": (True, False),
           "<think>a</think>b<think>c</think>d": (True, False), "<think>unclosed 5": (False, False),
           "</think>5<think>": (False, False), "<think>multi\nline</think>7": (True, True)}
  for text, (soft, strict) in cases.items():
    assert rewards.has_think_format(text) is soft, text
    assert rewards.has_think_format(text, strict=True) is strict, text


def test_reward_model_weights_and_accuracy():
  config = config_lib.get_base_config()
  model = rewards.RewardModel.from_config(config.rl)  # paper: correctness 2.0 + format 0.5
  samples = [{"response": "<think>1+1=2</think>2", "answer": "2"}, {"response": "<think>1+1=2</think>3", "answer": "2"},
             {"response": "2", "answer": "2"}, {"response": "nothing", "answer": "2"}]
  out = model(samples)
  np.testing.assert_allclose(out["total"], [2.5, 0.5, 2.0, 0.0])
  np.testing.assert_array_equal(out["accuracy"], [1, 0, 1, 0])
  np.testing.assert_array_equal(out["format"], [1, 1, 0, 0])
  config.rl.rewards, config.rl.reward_weights = ("correctness", "nonsense"), (1.0, 1.0)
  with pytest.raises(rewards.RewardError, match="unknown components \\['nonsense'\\]"):
    rewards.RewardModel.from_config(config.rl)
  with pytest.raises(rewards.RewardError, match="needs sample\\['answer'\\]"):
    rewards.correctness([{"response": "x"}])


def test_t2i_checker_rewards():
  world = tw.ToyWorld()
  record = world.example("test", 0)
  wrong = world.example("test", 1)
  blank = np.zeros_like(record["image"])
  samples = [{"image": record["image"], "record": record}, {"image": blank, "record": record},
             {"image": wrong["image"], "record": record}]
  checker = rewards.t2i_checker(samples)
  assert checker[0] == 1 and checker[1] == 0
  attrs = rewards.t2i_attributes(samples)
  assert attrs[0] == 1.0 and attrs[1] < 1.0 and 0 <= attrs.min()


def test_clip_score_math_and_missing_weights(tmp_path):
  image_embed = lambda x: np.stack([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[:len(x)]
  text_embed = lambda t: np.stack([[1.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])[:len(t)]
  score = rewards.ClipScore(image_embed, text_embed)
  samples = [{"image": np.zeros((4, 4, 3), np.uint8), "prompt": "p"}] * 3
  np.testing.assert_allclose(score(samples), [1.0, 0.0, 0.0], atol=1e-7)
  with pytest.raises(rewards.RewardError, match="rl.clip_model_dir"):
    rewards.load_clip("")
  with pytest.raises(rewards.RewardError, match="no such directory"):
    rewards.load_clip(str(tmp_path / "missing"))
  with pytest.raises(rewards.RewardError, match="rl.image_reward_dir"):
    rewards.load_image_reward("")
  config = config_lib.get_base_config()
  config.rl.rewards, config.rl.reward_weights = ("clip",), (10.0,)
  with pytest.raises(rewards.RewardError, match="needs local weights"):
    rewards.RewardModel.from_config(config.rl)
  rewards.register_reward("constant_one", lambda s: np.ones(len(s)))
  config.rl.rewards, config.rl.reward_weights = ("constant_one",), (0.5,)
  np.testing.assert_allclose(rewards.RewardModel.from_config(config.rl)([{}, {}])["total"], [0.5, 0.5])
