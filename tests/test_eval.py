"""`mmada-jax eval` on a few ToyWorld test records with a tiny random model, and the math answer extractor."""

import json
import os

import pytest

from mmada_jax import config as config_lib
from mmada_jax.data import toyworld as tw
from mmada_jax.cli import eval as eval_cmd
from mmada_jax.eval import answers, toyworld_eval as te
from test_sample_cli import CONFIG, OVERRIDES, build_checkpoints, config_args, load_config


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  return build_checkpoints(tmp_path_factory.mktemp("eval"))


def test_eval_all_tasks_writes_json_markdown_and_grid(ckpts, capsys):
  args = ["--workdir", ckpts["workdir"], "--magvit", ckpts["magvit"], "--count", "3", "--batch_size", "2",
          "--config.sampling.eval_text.gen_length=8", "--config.sampling.eval_text.block_length=4",
          "--config.sampling.eval_text.steps=4"]
  assert eval_cmd.main(args + config_args()) == 0
  out = capsys.readouterr()
  base = os.path.join(ckpts["workdir"], "eval", "toyworld_step7")
  with open(base + ".json") as f:
    result = json.load(f)
  assert set(result["accuracy"]) == {"text", "mmu", "t2i"}
  assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
  assert result["checkpoint"]["step"] == 7 and result["count"] == 3 and result["split"] == "test"
  for task, res in result["tasks"].items():
    assert res["count"] == 3 and sum(k["count"] for k in res["by_kind"].values()) == 3, task
    assert 1 <= len(res["examples"]) <= 3
    assert 0.0 <= res["chance"]["accuracy"] <= 1.0 and res["chance"]["method"], task
  assert result["tasks"]["text"]["text_format"] == "chat" and 0.0 <= result["tasks"]["text"]["format"] <= 1.0
  assert result["tasks"]["mmu"]["cot"] is True  # the cot stage trains CoT visual answers
  attrs = result["tasks"]["t2i"]["attributes"]
  assert {"count", "colour", "shape", "mean"} <= set(attrs) and all(0.0 <= v <= 1.0 for v in attrs.values())
  assert all("attributes" in k for k in result["tasks"]["t2i"]["by_kind"].values())
  assert "| t2i | attribute score (colour " in out.out
  # the text task runs with sampling.eval_text, the visual questions with sampling.text
  assert result["settings"]["text"]["gen_length"] == 8 and result["settings"]["text"]["block_length"] == 4
  assert result["settings"]["mmu"]["gen_length"] == 16 and result["settings"]["image"]["timesteps"] == 2
  assert "| text | all |" in out.out and "| t2i | all |" in out.out and "| mmu | chance: the most frequent" in out.out
  assert os.path.exists(base + ".md") and os.path.exists(base + "_t2i.png")
  with pytest.raises(config_lib.ConfigError, match="output exists.*--overwrite"):
    eval_cmd.main(args + config_args())


def test_attribute_means_count_each_attribute_where_scored():
  """Position is scored for "describe" prompts only, so its mean is over those images; `mean` is the mean over images
  of their attribute average (what the `t2i_attributes` reward pays)."""
  scores = [dict(count=1.0, position=0.5, colour=1.0, shape=0.5), dict(count=0.0, colour=1 / 3, shape=1 / 3)]
  out = te._attribute_means(scores)
  assert out["position"] == 0.5 and out["count"] == 0.5 and out["colour"] == pytest.approx(2 / 3)
  assert out["mean"] == pytest.approx((0.75 + 2 / 9) / 2)
  assert te._attribute_means([]) == {"mean": 0.0}


def test_eval_plain_text_task_only(ckpts, tmp_path):
  out = str(tmp_path / "r.json")
  args = ["--params", ckpts["params"], "--tasks", "text", "--text_format", "plain", "--count", "2", "--out", out]
  assert eval_cmd.main(args + config_args()) == 0
  with open(out) as f:
    result = json.load(f)
  assert set(result["tasks"]) == {"text"} and result["tasks"]["text"]["text_format"] == "plain"
  assert result["tasks"]["text"]["examples"][0]["prompt"].endswith(" is")
  assert not os.path.exists(str(tmp_path / "r_t2i.png"))


@pytest.mark.parametrize("args,message", [
    (["--tasks", "text,sound"], r"unknown task\(s\) \['sound'\]"),
    (["--tasks", "mmu"], "need the image tokenizer"),
    (["--count", "0"], "--count and --batch_size must be >= 1"),
    ([], "exactly one of --params"),
])
def test_eval_errors(args, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    eval_cmd.main(args + (["--params", "x"] if args else []) + config_args())


def test_task_defaults_and_formats():
  config = load_config()
  assert eval_cmd._tasks(None, config, None) == ("text",)  # no image tokenizer: text only
  assert eval_cmd._tasks(None, config, "magvit") == te.TASKS
  assert te.text_format(config) == "chat" and te.mmu_cot(config)
  stage1 = config_lib.load_config(CONFIG.replace(":cot", ":stage1"), OVERRIDES)
  assert te.text_format(stage1) == "plain" and not te.mmu_cot(stage1)
  record = tw.ToyWorld.from_config(config).example("test", 0, render_image=False)
  prefix = te.plain_prefix(record)
  assert record["lm_text"] == f"{prefix} {record['problem_answer']}."


def test_padded_batches():
  assert te.padded_batches(5, 2) == [[0, 1], [2, 3], [4, 4]]
  assert te.padded_batches(2, 4) == [[0, 1, 1, 1]]


@pytest.mark.parametrize("response,expected", [
    ("<think>3+4=7</think>The answer is 7.", "7"),
    ("<think>so 3+4=7 and 7*2=14</think>", None),  # nothing after the reasoning
    ("Natalia sold 48/2 = 24 clips in May. 48+24 = 72 #### 72", "72"),
    ("#### 1,200", "1200"),
    ("It costs $18.00 in total.", "18"),
    ("The temperature drops to -3 degrees", "-3"),
    ("half: 0.5", "1/2"),
    ("\\boxed{\\frac{2}{4}}", "1/2"),
    ("so \\boxed{\\dfrac{3}{4}} and then 5", "3/4"),
    ("\\boxed{72 \\text{ dollars}}", "72"),
    ("\\boxed{x+1}", "x+1"),
    ("#### no idea", "no idea"),
    ("no number here", None),
    ("<think>2 boxes of 3</think> 6 balls, i.e. 6", "6"),
])
def test_extract_answer(response, expected):
  assert answers.extract_answer(response) == expected


def test_answers_match_references():
  assert answers.gold_answer("Half of 48 is 24.\n#### 1,024") == "1024"
  assert answers.is_correct("<think>1000+24</think>1024", "#### 1,024")
  assert answers.is_correct("\\boxed{0.75}", "\\frac{3}{4}")
  assert not answers.is_correct("<think>24</think>", "24")
  assert answers.normalize_number("$ 1,000.50") == "2001/2" and answers.normalize_number("abc") is None


def test_periodic_sampler_matches_eval_cli_and_writes_files(ckpts, tmp_path):
  """The in-training generation eval (`train.sample_every`) scores like `mmada-jax eval` on the same parameters."""
  import jax

  from mmada_jax import checkpoint as ckpt
  from mmada_jax.eval import periodic
  from mmada_jax.models import llada

  config = load_config(**{"data.image_tokenizer": ckpts["magvit"], "train.sample_every": "5",
                          "train.sample_count": "3"})
  assert periodic.sample_tasks(config) == ("text", "mmu", "t2i")  # the cot stage trains all three
  params, _ = ckpt.load_params(ckpts["params"], as_numpy=True)
  sampler = periodic.PeriodicSampler(config, llada.build_model(config.model), str(tmp_path), log=lambda _: None)
  assert sampler.due(5, 12) and sampler.due(12, 12) and not sampler.due(6, 12)
  scores = sampler(5, jax.device_put(params))
  assert set(scores) == {"sample_acc_text", "sample_acc_mmu", "sample_acc_t2i"}
  for ext in ("json", "md", "png"):
    assert os.path.exists(tmp_path / "samples" / f"step5.{ext}"), ext
  out = str(tmp_path / "cli.json")
  args = ["--params", ckpts["params"], "--magvit", ckpts["magvit"], "--count", "3", "--batch_size", "3", "--out", out]
  assert eval_cmd.main(args + config_args()) == 0
  with open(out) as f:
    cli = json.load(f)
  assert {f"sample_acc_{t}": a for t, a in cli["accuracy"].items()} == scores
  with open(tmp_path / "samples" / "step5.json") as f:
    assert [e["answer"] for e in json.load(f)["tasks"]["text"]["examples"]] == \
        [e["answer"] for e in cli["tasks"]["text"]["examples"]]


def test_periodic_sampler_task_errors():
  from mmada_jax.eval import periodic

  with pytest.raises(ValueError, match="need images"):
    periodic.sample_tasks(load_config(**{"train.sample_every": "5"}))
  assert periodic.sample_tasks(load_config(**{"train.sample_every": "5", "train.sample_tasks": "text"})) == ("text",)
  with pytest.raises(ValueError, match=r"unknown task\(s\) \['audio'\]"):
    periodic.sample_tasks(load_config(**{"train.sample_tasks": "text,audio"}))


def test_eval_t2i_clip_score_from_injected_embedders(ckpts):
  """The CLIP score path of `eval_t2i` (`mmada-jax eval --clip DIR` loads real CLIP weights into the same hook)."""
  import jax
  import numpy as np

  from mmada_jax.inference import presets, sampler as sampler_lib
  from mmada_jax.rl import rewards

  config = load_config(**{"data.image_tokenizer": ckpts["magvit"]})
  sampler = sampler_lib.Sampler.load(config, params=ckpts["params"], need_images=True, log=lambda _: None)
  records = [tw.ToyWorld.from_config(config).example("test", i) for i in range(3)]
  seen = []

  def image_embed(images):
    seen.append(images.shape)
    return np.tile([1.0, 0.0], (len(images), 1))

  aligned = rewards.ClipScore(image_embed, lambda texts: np.tile([1.0, 0.0], (len(texts), 1)))
  half = rewards.ClipScore(image_embed, lambda texts: np.tile([1.0, 1.0], (len(texts), 1)))
  settings = presets.image_settings(config)
  res, _ = te.eval_t2i(sampler, records, settings, 2, jax.random.key(0), clip=aligned)
  assert res["clip_score"] == pytest.approx(100.0) and [s[0] for s in seen] == [2, 1]  # padding repeats not scored
  res, _ = te.eval_t2i(sampler, records, settings, 2, jax.random.key(0), clip=half)
  assert res["clip_score"] == pytest.approx(100.0 / np.sqrt(2.0))
  assert "| t2i | CLIP score (×100) | 70.71 | 3 |" in te.format_table({"tasks": {"t2i": res}})


def test_eval_clip_needs_t2i_and_local_weights(ckpts, tmp_path):
  args = ["--params", ckpts["params"], "--magvit", ckpts["magvit"], "--count", "1"]
  with pytest.raises(config_lib.ConfigError, match="add t2i to --tasks"):
    eval_cmd.main(args + ["--tasks", "text", "--clip", str(tmp_path)] + config_args())
  with pytest.raises(ValueError, match="no such directory"):
    eval_cmd.main(args + ["--tasks", "t2i", "--clip", str(tmp_path / "missing"), "--out", str(tmp_path / "o.json")]
                 + config_args())


def test_chance_baselines():
  """Answers that ignore the input: the majority training answer per operation / question kind, and for t2i another
  record's true image (its own image passes the checker every time, which shows what the baseline leaves out)."""
  from collections import Counter

  world = tw.ToyWorld()
  records = [world.example("test", i) for i in range(40)]
  train = [world.example("train", i, render_image=False) for i in range(te.CHANCE_TRAIN_RECORDS)]
  for kind in ("count_colour", "exists"):
    majority = Counter(r["answer"] for r in train if r["question_kind"] == kind).most_common(1)[0][0]
    subset = [r for r in records if r["question_kind"] == kind]
    expected = sum(r["answer"] == majority for r in subset) / len(subset)
    assert te.chance_baseline(world, "mmu", subset, 40)["accuracy"] == pytest.approx(expected), kind
  text = te.chance_baseline(world, "text", records, 40)
  assert 0.0 < text["accuracy"] < 0.5 and "operation" in text["method"]
  assert te.chance_baseline(world, "t2i", records, 0)["accuracy"] == 1.0  # each record's own image
  assert te.chance_baseline(world, "t2i", records, 40)["accuracy"] < 0.1
  row = te.format_table({"tasks": {"text": {"accuracy": 0.5, "count": 40, "by_kind": {}, "chance": text}}})
  assert f"| text | chance: the most frequent training answer per operation | {text['accuracy']:.3f} | 40 |" in row


def test_showcase_answers_and_frames_drawings_by_verdict(ckpts):
  """`eval.showcase` (the end of `mmada-jax demo`): answers and verdicts agree with the ToyWorld checkers, the grid
  frames each drawing in the colour of its verdict, and the report has a line per answer and drawing."""
  import numpy as np

  from mmada_jax.data import toyworld_checkers as checkers
  from mmada_jax.eval import showcase
  from mmada_jax.inference import sampler as sampler_lib

  config = load_config(**{"data.image_tokenizer": ckpts["magvit"]})
  sampler = sampler_lib.Sampler.load(config, params=ckpts["params"], need_images=True, log=lambda _: None)
  shown = showcase.show(sampler, index=1, num_drawings=3)
  record = tw.ToyWorld.from_config(config).example("test", 1)
  assert shown.text.question == record["problem"] and shown.mmu.question == record["question"]
  assert shown.text.correct == checkers.check_answer(shown.text.answer, record["problem_answer"])
  assert shown.mmu.correct == checkers.check_answer(shown.mmu.answer, record["answer"])
  assert len(shown.prompts) == len(shown.verdicts) == 3 and shown.grid.dtype == np.uint8
  assert len(showcase.report(shown)) == 4 + 3
  images = np.zeros((2, 4, 4, 3), np.uint8)
  out = showcase.framed(images, [True, False], width=1)
  assert out.shape == (2, 6, 6, 3)
  assert tuple(out[0, 0, 0]) == showcase.PASS and tuple(out[1, 5, 5]) == showcase.FAIL
  assert not out[:, 1:5, 1:5].any()  # the images themselves are inside the frames
