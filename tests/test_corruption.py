"""On-device corruption: exact image mask counts and labels, answer-only text masking, the distribution of p, and masks
that depend only on (step key, task, example id) — not on batch order, batch size or sharding."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmada_jax import config as config_lib
from mmada_jax.diffusion import corruption
from mmada_jax.tokens import prompting, vocab as vocab_lib

TINY = pathlib.Path(__file__).parent.parent / "experiments" / "tiny.py"


@pytest.fixture(scope="module")
def config():
  c = config_lib.load_config(str(TINY))
  c.unlock()
  return c


def clean_batch(config, rows: int = 8, seed: int = 0) -> dict:
  """Official layouts (tiny: S = 7, N = 64, L = 74) for `rows` examples of every task; lm alternates plain and chat."""
  p = prompting.Prompter(vocab_lib.Vocab.from_config(config.vocab), int(config.data.max_text_len),
                         int(config.vocab.num_image_tokens))
  v = p.vocab
  rng = np.random.default_rng(seed)
  text = lambda n: list(rng.integers(0, 200, size=n))
  codes = lambda: rng.integers(0, v.codebook_size, size=p.num_image_tokens)
  chat = lambda: [v.start_header_id, 5, v.end_header_id] + text(6) + [v.eot_id, v.start_header_id, 6, v.end_header_id]
  t2i = [p.t2i(text(1 + i % 5), codes()) for i in range(rows)]
  lm = [p.lm_chat(text(30)) if i % 2 == 0 else p.lm_chat(chat() + text(20)) for i in range(rows)]
  mmu = [p.mmu(codes(), chat() + text(3)) for _ in range(rows)]
  return {t: jax.tree.map(jnp.asarray, prompting.stack(r)) for t, r in (("t2i", t2i), ("lm", lm), ("mmu", mmu))}


def with_ids(batch: dict, ids) -> dict:
  return {t: dict(a, example_id=jnp.asarray(ids, jnp.int32)) for t, a in batch.items()}


def take(batch: dict, rows) -> dict:
  rows = np.asarray(rows)
  return {t: {k: v[rows] for k, v in a.items()} for t, a in batch.items()}


_JITTED = {}


def run(batch, key, config):
  """`corrupt_batch` under jit, compiled once per config (and shapes)."""
  frozen = config.to_json()
  if frozen not in _JITTED:
    c = config.copy_and_resolve_references()
    _JITTED[frozen] = jax.jit(lambda b, k: corruption.corrupt_batch(b, k, c))
  return _JITTED[frozen](batch, key)


def test_image_masks_exact_count_and_labels(config):
  batch = clean_batch(config, rows=8)
  key = jax.random.key(0)
  out = run(batch, key, config)["t2i"]
  clean, noisy, labels = (np.asarray(x) for x in (batch["t2i"]["input_ids"], out["input_ids"], out["labels"]))
  masked = np.asarray(out["masked"])
  image = np.asarray(batch["t2i"]["prompt_mask"]) == 0
  n_img = image.sum(-1)
  assert (n_img == config.vocab.num_image_tokens).all()
  # The count follows the official formula n = max(round(N cos(pi t / 2)), 1) for the row's t (its first uniform).
  keys = corruption.example_keys(key, "t2i", jnp.arange(8))
  t = np.asarray(jax.vmap(lambda k: corruption.row_uniforms(k, clean.shape[1])[0])(keys))
  expected = np.maximum(np.round(n_img * np.cos(t.astype(np.float32) * np.float32(np.pi / 2))), 1)
  np.testing.assert_array_equal(masked.sum(-1), expected)
  np.testing.assert_allclose(np.asarray(out["mask_rate"]), expected / n_img)
  assert not (masked & ~image).any()
  np.testing.assert_array_equal(noisy, np.where(masked, config.vocab.mask_id, clean))
  clean_labels = np.asarray(batch["t2i"]["labels"])
  np.testing.assert_array_equal(labels, np.where(image & ~masked, -100, clean_labels))
  s = config.data.max_text_len
  assert (labels[:, s + 1] == config.vocab.soi_id).all() and (labels[:, -1] == config.vocab.eoi_id).all()


def test_image_always_masks_at_least_one_token():
  """With N = 4 a fifth of the rows would get round(4 r) = 0 without the clamp; every row masks >= 1 token."""
  ids = jnp.tile(jnp.arange(10, 14), (2000, 1))
  keys = corruption.example_keys(jax.random.key(1), "t2i", jnp.arange(2000))
  fn = lambda k, i: corruption.mask_image(k, i, i, jnp.ones(4, bool), mask_id=0)
  _, _, masked, n = jax.jit(jax.vmap(fn))(keys, ids)
  counts = np.asarray(masked).sum(-1)
  np.testing.assert_array_equal(counts, np.asarray(n))
  assert counts.min() == 1 and counts.max() == 4
  assert (counts == 1).mean() > 0.2  # the clamped rows are there (P(round(4 cos(pi t/2)) <= 1) ≈ 0.245)
  # Mean mask ratio of the cosine schedule: E[cos(pi t / 2)] = 2 / pi (big N, so rounding does not matter).
  big = jnp.tile(jnp.arange(256), (2000, 1))
  fn = lambda k, i: corruption.mask_image(k, i, i, jnp.ones(256, bool), mask_id=0)
  ratio = np.asarray(jax.jit(jax.vmap(fn))(keys, big)[3]) / 256
  assert abs(ratio.mean() - 2 / np.pi) < 0.02


def test_image_mask_rate_schedules():
  t = jnp.array([0.0, 0.5, 0.999])
  np.testing.assert_allclose(corruption.image_mask_rate(t, "cosine"), np.cos(np.asarray(t) * np.pi / 2), rtol=1e-6)
  np.testing.assert_allclose(corruption.image_mask_rate(t, "linear", 0.3), [1.0, 0.5, 0.3], rtol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    corruption.image_mask_rate(t, "pow")


def test_text_answer_only_and_plain_rows(config):
  batch = clean_batch(config, rows=8)
  out = run(batch, jax.random.key(2), config)
  for task in ("lm", "mmu"):
    prompt = np.asarray(batch[task]["prompt_mask"]) == 1
    masked = np.asarray(out[task]["masked"])
    assert not (masked & prompt).any(), task
    assert masked.any(), task
    np.testing.assert_array_equal(np.asarray(out[task]["input_ids"]),
                                  np.where(masked, config.vocab.mask_id, np.asarray(batch[task]["input_ids"])))
    np.testing.assert_array_equal(np.asarray(out[task]["answer_len"]), np.maximum((~prompt).sum(-1), 1))
  plain = np.asarray(batch["lm"]["prompt_mask"])[0::2]
  assert (plain == 0).all()  # plain text: every position (BOS and EOS padding included) may be masked
  assert np.asarray(batch["mmu"]["prompt_mask"])[:, :config.vocab.num_image_tokens + 3].all()
  # Without answer-only masking the lm prompts are corrupted too (mmu stays answer-only, as officially).
  config.loss.lm_answer_only = False
  try:
    free = run(batch, jax.random.key(2), config)
  finally:
    config.loss.lm_answer_only = True
  lm_prompt = np.asarray(batch["lm"]["prompt_mask"]) == 1
  assert (np.asarray(free["lm"]["masked"]) & lm_prompt).any()
  assert not (np.asarray(free["mmu"]["masked"]) & (np.asarray(batch["mmu"]["prompt_mask"]) == 1)).any()


def test_text_p_statistics():
  rows, length, eps = 4000, 64, 1e-3
  keys = corruption.example_keys(jax.random.key(3), "lm", jnp.arange(rows))
  ids = jnp.zeros((rows, length), jnp.int32)
  fn = lambda k, i: corruption.mask_text(k, i, None, mask_id=1, eps=eps)
  _, masked, p = jax.jit(jax.vmap(fn))(keys, ids)
  p, masked = np.asarray(p), np.asarray(masked)
  assert p.min() >= eps and p.max() <= 1.0
  assert abs(p.mean() - 0.5) < 0.02 and abs(p.std() - (1 - eps) / np.sqrt(12)) < 0.02  # U(eps, 1)
  assert abs(masked.mean() - p.mean()) < 0.01  # Bernoulli(p) per token
  np.testing.assert_allclose(masked.mean(-1)[p > 0.9].mean(), p[p > 0.9].mean(), atol=0.02)


def test_masks_depend_only_on_example_id(config):
  """Same example_id → same mask, whether in a batch of 8, in two batches of 4, or in another order."""
  batch = with_ids(clean_batch(config, rows=8), np.arange(100, 108))
  key = jax.random.key(4)
  whole = run(batch, key, config)
  halves = [run(take(batch, r), key, config) for r in (range(4), range(4, 8))]
  perm = np.random.default_rng(0).permutation(8)
  shuffled = run(take(batch, perm), key, config)
  for task in corruption.TASKS:
    for name in whole[task]:
      w = np.asarray(whole[task][name])
      np.testing.assert_array_equal(np.concatenate([np.asarray(h[task][name]) for h in halves]), w, err_msg=name)
      np.testing.assert_array_equal(np.asarray(shuffled[task][name]), w[perm], err_msg=name)
  # Different tasks with the same ids get different masks; a different step key gives different masks.
  assert not np.array_equal(np.asarray(whole["lm"]["masked"]), np.asarray(whole["mmu"]["masked"]))
  other = run(batch, jax.random.key(5), config)
  assert not np.array_equal(np.asarray(other["t2i"]["masked"]), np.asarray(whole["t2i"]["masked"]))


def test_masks_independent_of_sharding(config):
  batch = clean_batch(config, rows=8)
  key = jax.random.key(6)
  ref = run(batch, key, config)
  devices = np.asarray(jax.devices()[:8])
  mesh = Mesh(devices.reshape(4, 2), ("data", "model"))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  sharded = jax.jit(lambda b, k: corruption.corrupt_batch(b, k, config),
                    out_shardings=NamedSharding(mesh, PartitionSpec("data")))(jax.tree.map(shard, batch), key)
  for task in corruption.TASKS:
    for name in ref[task]:
      np.testing.assert_array_equal(np.asarray(sharded[task][name]), np.asarray(ref[task][name]), err_msg=name)


def test_missing_keys_and_unknown_tasks(config):
  batch = clean_batch(config, rows=2)
  bad = {"lm": {k: v for k, v in batch["lm"].items() if k != "prompt_mask"}}
  with pytest.raises(KeyError, match="prompt_mask"):
    corruption.corrupt_batch(bad, jax.random.key(0), config)
  with pytest.raises(KeyError, match="unknown tasks"):
    corruption.corrupt_batch({"video": batch["lm"]}, jax.random.key(0), config)
  wrong = {"t2i": dict(batch["t2i"], labels=batch["t2i"]["labels"][:, :5])}
  with pytest.raises(ValueError, match="labels"):
    corruption.corrupt_batch(wrong, jax.random.key(0), config)
