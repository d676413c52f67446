"""ToyWorld: determinism, internal consistency of every task, and the checkers' accuracy (truth vs blank/noise)."""

import json
import re

import numpy as np
import pytest

from mmada_jax import config as config_lib
from mmada_jax.data import toyworld as tw
from mmada_jax.data import toyworld_checkers as ck

WORLD = tw.ToyWorld(image_size=64, grid=3, max_objects=4, seed=0)


def test_deterministic_per_seed_and_fixed_test_split():
  a, b = WORLD.example("train", 7), WORLD.example("train", 7)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert {k: v for k, v in a.items() if k not in ("image", "objects")} == \
         {k: v for k, v in b.items() if k not in ("image", "objects")}
  other = tw.ToyWorld(seed=1)
  diffs = sum(not np.array_equal(WORLD.example("train", i)["image"], other.example("train", i)["image"])
              for i in range(10))
  assert diffs >= 9
  for i in range(5):  # the held-out test split ignores the training seed
    np.testing.assert_array_equal(WORLD.example("test", i)["image"], other.example("test", i)["image"])
  assert WORLD.example("train", 3)["id"] == "toyworld/train/3"
  assert a["image"].shape == (64, 64, 3) and a["image"].dtype == np.uint8
  assert a["objects"].shape == (4, 3) and (a["objects"][a["num_objects"]:] == -1).all()


def test_from_config_and_bad_sizes():
  cfg = config_lib.get_base_config()
  assert tw.ToyWorld.from_config(cfg) == tw.ToyWorld(image_size=64, grid=3, max_objects=4, seed=0)
  with pytest.raises(ValueError, match="grid=2 below 48 px"):
    tw.ToyWorld(image_size=32, grid=3)
  with pytest.raises(ValueError, match="max_objects"):
    tw.ToyWorld(image_size=32, grid=2, max_objects=5)
  with pytest.raises(ValueError, match="unknown ToyWorld split"):
    WORLD.example("dev", 0)


def _expected_answer(record):
  objs = tw.objects_of(record)
  q, kind = record["question"], record["question_kind"]
  word = re.findall(r"\w+", q)
  if kind == "count_shape":
    return str(sum(tw.plural(o.shape, 2) == word[2] for o in objs))
  if kind == "count_colour":
    return str(sum(tw.COLOURS[o.colour] == word[2] for o in objs))
  if kind == "count_all":
    return str(len(objs))
  if kind == "exists":
    return "yes" if any(f"{tw.COLOURS[o.colour]} {tw.SHAPES[o.shape]}" in q for o in objs) else "no"
  if kind == "colour_of":
    return next(tw.COLOURS[o.colour] for o in objs if tw.SHAPES[o.shape] == word[-1])
  if kind == "shape_of":
    return next(tw.SHAPES[o.shape] for o in objs if tw.COLOURS[o.colour] == word[-2])
  if kind == "where":
    return next(tw.POSITIONS[3][o.cell] for o in objs if f"{tw.COLOURS[o.colour]} {tw.SHAPES[o.shape]}" in q)
  return tw.caption(objs, 3)


def test_every_task_is_consistent_with_the_scene():
  kinds, draws = set(), set()
  for i in range(300):
    r = WORLD.example("train", i, render_image=False)
    kinds.add(r["question_kind"])
    draws.add(r["draw_kind"])
    assert r["answer"] == _expected_answer(r), r
    lhs, rhs = r["problem_reasoning"].split("=")
    assert eval(lhs) == int(rhs) == int(r["problem_answer"])  # noqa: S307 (digits and + - * only)
    if r["draw_kind"] == "reason":
      expr = re.search(r"as (\S+)$", r["draw_prompt"]).group(1)
      assert eval(expr) == r["target_count"] == r["num_objects"]  # noqa: S307
      assert r["draw_reasoning"].startswith(f"{expr}={r['target_count']}")
    if r["draw_kind"] != "describe":
      assert all(o.colour == r["target_colour"] and o.shape == r["target_shape"] for o in tw.objects_of(r))
  assert kinds == set(tw.QUESTION_KINDS) and draws == set(tw.DRAW_KINDS)


@pytest.mark.parametrize("size,grid", [(64, 3), (32, 2)])
def test_checker_accuracy_on_truth_and_on_blank_or_noise(size, grid):
  world = tw.ToyWorld(image_size=size, grid=grid, max_objects=min(4, grid * grid))
  truth = ck.measure_accuracy(world, "test", 150, "truth")
  assert truth["draw"] >= 0.99 and truth["scene"] >= 0.99, truth
  for attr in ("count", "position", "colour", "shape"):
    assert truth[attr] >= 0.99, truth
  for kind in ("blank", "noise"):
    fooled = ck.measure_accuracy(world, "test", 40, kind)
    assert fooled["draw"] == 0 and fooled["scene"] == 0, (kind, fooled)
  # Another record's image passes only by coincidence (a count prompt drawn twice): at most chance level.
  assert ck.measure_accuracy(world, "test", 100, "shuffled")["draw"] <= 0.03


def test_checker_tolerates_pixel_noise_and_float_images():
  rng = np.random.default_rng(0)
  ok = 0
  for i in range(60):
    r = WORLD.example("validation", i)
    noisy = np.clip(r["image"] + rng.normal(0, 12, r["image"].shape), 0, 255).astype(np.uint8)
    ok += ck.check_draw(noisy, r) and ck.check_draw(r["image"] / 255.0, r)
  assert ok >= 59
  with pytest.raises(ValueError, match="square RGB image"):
    ck.detect(np.zeros((8, 8)))


def test_check_rejects_wrong_images():
  r = next(WORLD.example("test", i) for i in range(100) if WORLD.example("test", i, False)["draw_kind"] == "count")
  objs = tw.objects_of(r)
  # Wrong colour, wrong shape, one object too many.
  recolour = [tw.Obj(o.shape, (o.colour + 1) % 6, o.cell) for o in objs]
  reshape = [tw.Obj((o.shape + 1) % 3, o.colour, o.cell) for o in objs]
  free = next(c for c in range(9) if c not in {o.cell for o in objs})
  extra = objs + [tw.Obj(objs[0].shape, objs[0].colour, free)]
  for wrong in (recolour, reshape, extra):
    image = tw.render(wrong, 64, 3, np.random.default_rng(1))
    assert not ck.check_draw(image, r)
  assert ck.check_draw(tw.render(objs, 64, 3, np.random.default_rng(2)), r)  # the same scene, redrawn
  whole = np.zeros((64, 64, 3), np.uint8)
  whole[:] = tw.PALETTE[objs[0].colour]
  assert ck.detect(whole) == []  # a full-image fill is not a shape


def test_draw_attribute_scores_follow_the_prompt():
  """Count / reason prompts leave positions free: the same objects moved score 1 (the record's scene is one layout of
  many); wrong colour / shape / count lose exactly that attribute; all scores are 1 exactly when `check_draw` passes."""
  rng = np.random.default_rng(3)
  r = next(WORLD.example("test", i) for i in range(100) if WORLD.example("test", i, False)["draw_kind"] == "count")
  objs = tw.objects_of(r)
  taken = {o.cell for o in objs}
  moved = [tw.Obj(o.shape, o.colour, c) for o, c in zip(objs, [c for c in range(9) if c not in taken])]
  assert len(moved) == len(objs) and not {o.cell for o in moved} & taken
  image = tw.render(moved, 64, 3, rng)
  assert ck.check_draw(image, r) and ck.draw_attribute_scores(image, r) == dict(count=1.0, colour=1.0, shape=1.0)
  assert ck.attribute_scores(image, objs)["position"] == 0  # the scene-based score would have paid for the layout
  recolour = tw.render([tw.Obj(o.shape, (o.colour + 1) % 6, o.cell) for o in objs], 64, 3, rng)
  assert ck.draw_attribute_scores(recolour, r) == dict(count=1.0, colour=0.0, shape=1.0)
  free = sorted(set(range(9)) - taken)
  extra = tw.render(objs + [tw.Obj(objs[0].shape, objs[0].colour, free[0])], 64, 3, rng)
  n = len(objs)
  assert ck.draw_attribute_scores(extra, r) == dict(count=0.0, colour=n / (n + 1), shape=n / (n + 1))  # extras cost
  # ... and drawing more is no better than drawing fewer: n + 2 objects score below n - 1 objects (n >= 2 here)
  more = tw.render(objs + [tw.Obj(objs[0].shape, objs[0].colour, c) for c in free[:2]], 64, 3, rng)
  fewer = tw.render(objs[:-1], 64, 3, rng)
  assert n >= 2 and np.mean(list(ck.draw_attribute_scores(more, r).values())) < np.mean(
      list(ck.draw_attribute_scores(fewer, r).values()))
  d = next(WORLD.example("test", i) for i in range(100) if WORLD.example("test", i, False)["draw_kind"] == "describe")
  dobjs = tw.objects_of(d)
  spare = next(c for c in range(9) if c not in {o.cell for o in dobjs})
  scene = ck.attribute_scores(tw.render(dobjs + [tw.Obj(0, 0, spare)], 64, 3, rng), dobjs)
  m = len(dobjs)
  assert scene == dict(count=0.0, position=m / (m + 1), colour=m / (m + 1), shape=m / (m + 1))
  # Over test records and probe images (truth, another record's image, a blank): all 1 <=> the checker passes.
  for i in range(120):
    rec = WORLD.example("test", i)
    for image in (rec["image"], WORLD.example("test", i + 500)["image"], np.zeros_like(rec["image"])):
      scores = ck.draw_attribute_scores(image, rec)
      assert all(0 <= v <= 1 for v in scores.values())
      assert (min(scores.values()) == 1.0) == ck.check_draw(image, rec), (i, scores)


def test_text_answer_checker():
  assert ck.check_answer("<think>3+4=7</think>7", "7", require_think=True)
  assert ck.check_answer("<think>3+4=7</think> 7.", "7")
  assert not ck.check_answer("<think>3+4=7</think>8", "7")
  assert not ck.check_answer("7", "7", require_think=True)
  assert not ck.check_answer("<think>7</think>17", "7")
  assert not ck.check_answer("<think>x</think>7 or 8", "7")
  assert ck.check_answer("Three", "3") and ck.check_answer("top left", "top left")
  assert not ck.check_answer("top", "top left")
  assert ck.check_answer("Red.", "red")


def test_command_line_build_and_check(tmp_path, capsys):
  from mmada_jax.cli import toyworld as toyworld_cmd

  args = ["build", f"--data_dir={tmp_path}", "--config.data.toyworld.num_train=4",
          "--config.data.toyworld.num_validation=1", "--config.data.toyworld.num_test=2"]
  assert toyworld_cmd.main(args) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["splits"] == {"train": 4, "validation": 1, "test": 2}
  assert out["source"] == "tfds:toy_world/s64_g3_m4_seed0_4_1_2"
  assert toyworld_cmd.main(["check", "--count=5", "--config.data.toyworld.image_size=32",
                            "--config.data.toyworld.grid=2"]) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
  assert [x["images"] for x in lines] == ["truth", "blank", "noise", "shuffled"]
  assert lines[0]["draw"] == 1.0 and lines[1]["draw"] == lines[2]["draw"] == 0.0


def test_cot_visual_answers_reuse_the_reasoning_tokens():
  """A CoT visual answer follows `</think>` after a space, so it tokenises as the same words inside the reasoning do;
  the tokenizer's own corpus keeps the original join."""
  from mmada_jax.tokens import vocab as vocab_lib

  vocab = vocab_lib.Vocab.from_config(vocab_lib.toy_vocab_values(num_plain_tokens=400))
  tok = tw.toy_tokenizer(vocab, num_records=300)
  close = tok.encode(vocab.think_close)
  assert len(close) == 1
  seen = set()
  for i in range(300):
    r = WORLD.example("train", i, render_image=False)
    text = tw.mmu_task_text(r, vocab, cot=True, literal_eot=False)
    assert f"{vocab.think_close} {r['answer']}" in text
    ids = tok.encode(text)
    after = ids[len(ids) - ids[::-1].index(close[0]):]  # after the last `</think>` (the instruction quotes one)
    assert after[:len(tok.encode(" " + r["answer"]))] == tok.encode(" " + r["answer"])
    if r["question_kind"] in ("colour_of", "shape_of", "where"):  # the answer's tokens occur in the scene's listing
      seen.add(r["question_kind"])
      want, listing = tok.encode(" " + r["answer"]), tok.encode(" " + r["caption"])
      assert any(listing[j:j + len(want)] == want for j in range(len(listing))), r["answer"]
  assert seen == {"colour_of", "shape_of", "where"}
  corpus = tw.tokenizer_corpus(WORLD, vocab, num_records=4)
  r = WORLD.example("train", 1, render_image=False)  # odd records appear in the CoT format
  assert any(f"{vocab.think_close}{r['answer']}" in t for t in corpus)
