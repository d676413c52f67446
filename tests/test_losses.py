"""The MMaDA losses: parity with the official `forward_process` on every loss fixture set, the memory-safe LM head
(exact, and no `[batch, length, vocab]` fp32 logits), additivity for accumulation, tasks without rows, the entry points.

A loss set `loss_<C>.npz` / `loss_<C>_<variant>.npz` belongs to the backbone `backbone_<C>` (docs/parity.md §6); the
batch composition, sequence length, [MASK] id and S are read from the file.
"""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import parity_dir
from mmada_jax import checkpoint as ckpt
from mmada_jax import config as config_lib
from mmada_jax.convert import official
from mmada_jax.diffusion import losses
from mmada_jax.models import llada
from mmada_jax.tokens import prompting, vocab as vocab_lib

RTOL = 1e-5
TINY = pathlib.Path(__file__).parent.parent / "experiments" / "tiny.py"


def loss_sets() -> list[str]:
  return sorted(p.stem for p in parity_dir().glob("loss_*.npz"))


def backbone_of(stem: str) -> str:
  return "backbone_" + stem.split("_")[1]


def test_loss_sets_exist_and_have_backbones():
  d = parity_dir()
  assert loss_sets(), f"no loss fixture set (loss_<C>.npz) found in {d} (set MMADA_PARITY_DIR)"
  for stem in loss_sets():
    b = backbone_of(stem)
    assert (d / f"{b}.safetensors").exists() and (d / f"{b}_config.json").exists(), f"{stem}: {b} missing in {d}"


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
  """Converted parameters and model per backbone stem, built on first use."""
  cache = {}

  def get(stem: str):
    if stem not in cache:
      tmp = tmp_path_factory.mktemp(stem)
      src = tmp / "official"
      src.mkdir()
      shutil.copyfile(parity_dir() / f"{stem}.safetensors", src / "model.safetensors")
      shutil.copyfile(parity_dir() / f"{stem}_config.json", src / "config.json")
      official.import_official(str(src), str(tmp / "out"), log=lambda s: None)
      params, meta = ckpt.load_params(str(tmp / "out"), as_numpy=True)
      model = llada.build_model(official.model_config_for(official.Shape(**meta["model"])))
      cache[stem] = (jax.tree.map(jnp.asarray, params), model)
    return cache[stem]

  return get


def fixture_config(z, **loss):
  config = config_lib.get_base_config()
  config.vocab.mask_id = int(z["mask_token_id"])
  config.data.max_text_len = int(z["max_seq_length"])
  for k, v in loss.items():
    config.loss[k] = v
  return config


def fixture_batch(z) -> dict:
  """The fixture's noisy batch split by task, with its fixed p values and answer lengths."""
  bt, bl, bm = (int(z[f"batch_size_{t}"]) for t in ("t2i", "lm", "mmu"))
  ids, labels = z["input_ids"], z["labels"]
  out = {}
  if bt:
    out["t2i"] = dict(input_ids=ids[:bt], labels=labels[:bt], valid_mask=z["t2i_masks"])
  if bl:
    out["lm"] = dict(input_ids=ids[bt:bt + bl], labels=labels[bt:bt + bl], p_mask=z["p_mask_lm"],
                     answer_len=z["answer_lengths_lm"])
  if bm:
    out["mmu"] = dict(input_ids=ids[bt + bl:], labels=labels[bt + bl:], p_mask=z["p_mask_mmu"],
                      answer_len=z["answer_lengths"])
  return jax.tree.map(jnp.asarray, out)


_JITTED = {}


def terms_of(params, batch, *, model, config):
  """`losses.loss_terms` under jit, one compiled function per (model, config) (much faster than eager on CPU)."""
  key = (id(model), config.to_json())
  if key not in _JITTED:
    _JITTED[key] = (model, jax.jit(lambda p, b: losses.loss_terms(p, b, model=model, config=config)))
  return _JITTED[key][1](params, batch)


def ratios(terms) -> dict:
  return {t: float(n / d) if float(d) > 0 else 0.0 for t, (n, d) in terms.items()}


def rel(a, b) -> float:
  return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


@pytest.mark.parametrize("head", ["gather", "chunked"])
@pytest.mark.parametrize("stem", loss_sets() or ["none"])
def test_loss_parity(stem, head, backbones):
  """loss_t2i, loss_lm (pre-training), loss_lm_sft and loss_mmu of the official forward_process, ≤ 1e-5 relative."""
  if stem == "none":
    pytest.fail(f"no loss fixture set found in {parity_dir()}")
  z = np.load(parity_dir() / f"{stem}.npz")
  params, model = backbones(backbone_of(stem))
  batch = fixture_batch(z)
  # Small chunks and groups of one row, so that the gathered head really compacts and chunks (and may fall back).
  kw = dict(head=head, head_chunk=5, head_capacity=0.5, head_groups=len(z["input_ids"]))
  got = ratios(terms_of(params, batch, model=model, config=fixture_config(z, **kw))[0])
  sft = ratios(terms_of(params, batch, model=model, config=fixture_config(z, lm_normalisation="answer", **kw))[0])
  errors = {"loss_t2i": rel(got["t2i"], z["loss_t2i"]), "loss_lm": rel(got["lm"], z["loss_lm"]),
            "loss_lm_sft": rel(sft["lm"], z["loss_lm_sft"]), "loss_mmu": rel(got["mmu"], z["loss_mmu"]),
            "loss_mmu_sft": rel(sft["mmu"], z["loss_mmu"]), "loss_t2i_sft": rel(sft["t2i"], z["loss_t2i"])}
  print(stem, head, {k: f"{v:.2e}" for k, v in errors.items()})
  assert max(errors.values()) <= RTOL, errors


@pytest.mark.parametrize("stem", loss_sets() or ["none"])
def test_per_sample_parity(stem, backbones):
  """Each lm row run alone (the other tasks absent) gives the official per_sample_loss_lm and _sft."""
  if stem == "none":
    pytest.fail(f"no loss fixture set found in {parity_dir()}")
  z = np.load(parity_dir() / f"{stem}.npz")
  params, model = backbones(backbone_of(stem))
  lm = fixture_batch(z)["lm"]
  for i in range(lm["input_ids"].shape[0]):
    row = {"lm": jax.tree.map(lambda x: x[i:i + 1], lm)}
    for norm, key in (("tokens", "per_sample_loss_lm"), ("answer", "per_sample_loss_lm_sft")):
      terms, _ = terms_of(params, row, model=model, config=fixture_config(z, lm_normalisation=norm))
      err = rel(terms["lm"][0] / terms["lm"][1], z[key][i])
      print(stem, f"{key}[{i}]", f"{err:.2e}")
      assert err <= RTOL, (key, i)
      assert float(terms["t2i"][1]) == 0 and float(terms["mmu"][1]) == 0


@pytest.mark.parametrize("stem", loss_sets()[:1] or ["none"])
def test_attention_conventions(stem, backbones):
  """float_bias (official) leaves lm/mmu rows unmasked, so they equal 'none'; hard masks change the padded t2i row."""
  if stem == "none":
    pytest.fail(f"no loss fixture set found in {parity_dir()}")
  z = np.load(parity_dir() / f"{stem}.npz")
  params, model = backbones(backbone_of(stem))
  batch = fixture_batch(z)
  batch = {t: dict(a, valid_mask=a.get("valid_mask", jnp.ones_like(a["input_ids"]))) for t, a in batch.items()}
  res = {a: ratios(terms_of(params, batch, model=model, config=fixture_config(z, attention=a, head="full"))[0])
         for a in losses.ATTENTION_CONVENTIONS}
  for task in ("lm", "mmu"):
    assert rel(res["none"][task], res["float_bias"][task]) < 1e-6
  if (np.asarray(z["t2i_masks"]) == 0).any():
    for a in ("key_mask", "pair_mask", "none"):
      assert rel(res[a]["t2i"], res["float_bias"]["t2i"]) > 1e-6, a


# ----------------------------------------------------------------------------------------------------------------------
# Memory-safe head on a model with a (comparatively) large vocabulary

BIG_V, ROWS, LENGTH, CHUNK = 2048, 4, 64, 8
# Masking probability of each row: with head_capacity 0.5 and one row per group, only the 0.9 row overflows.
OVERFLOW_P, FITTING_P = (0.1, 0.3, 0.5, 0.9), (0.1, 0.3, 0.2, 0.4)


def _avals(jaxpr):
  """Every abstract value inside a (closed) jaxpr, sub-jaxprs (cond, scan, remat, pjit) included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for v in list(jaxpr.invars) + list(jaxpr.outvars) + list(jaxpr.constvars):
    if hasattr(v, "aval"):
      yield v.aval
  for eqn in jaxpr.eqns:
    for v in list(eqn.outvars) + list(eqn.invars):
      if hasattr(v, "aval"):
        yield v.aval
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          yield from _avals(sub)


def _largest_logits(fn, params, *args) -> int:
  """Largest number of positions of any fp32 [..., BIG_V] array in the jaxpr of fn(params, *args) (the LM head
  kernel [embed, BIG_V] and its gradient excepted)."""
  kernel = tuple(params["lm_head"]["kernel"].shape)
  sizes = [int(np.prod(a.shape[:-1])) for a in _avals(jax.make_jaxpr(fn)(params, *args))
           if getattr(a, "shape", ()) and a.shape[-1] == BIG_V and a.dtype == jnp.float32 and len(a.shape) >= 2
           and tuple(a.shape) != kernel]
  return max(sizes)


def _objective(config, model):
  def f(params, batch):
    terms, metrics = losses.loss_terms(params, batch, model=model, config=config)
    return losses.combine(terms, config), metrics
  return f


def _with(config, **loss):
  c = config.copy_and_resolve_references()
  for k, v in loss.items():
    c.loss[k] = v
  return c


def _big_batch(config, probs) -> dict:
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 236, size=(ROWS, LENGTH))
  p = np.asarray(probs, np.float32)
  noisy = np.where(rng.random((ROWS, LENGTH)) < p[:, None], config.vocab.mask_id, ids)
  ones = np.ones_like(ids)
  batch = {"lm": dict(input_ids=noisy[:3], labels=ids[:3], p_mask=p[:3], valid_mask=ones[:3]),
           "mmu": dict(input_ids=noisy[3:], labels=ids[3:], p_mask=p[3:], answer_len=np.array([40.0], np.float32),
                       valid_mask=ones[3:])}
  return jax.tree.map(jnp.asarray, batch)


@pytest.fixture(scope="module")
def big():
  """A 1-layer model with a 2048-row head, two batches, and the full-logits reference loss and gradients."""
  config = config_lib.load_config(str(TINY))
  config.unlock()
  config.model.num_layers, config.model.vocab_size = 1, BIG_V
  model = llada.build_model(config.model)
  params = llada.init_params(model, jax.random.key(0))
  batches = [_big_batch(config, probs) for probs in (OVERFLOW_P, FITTING_P)]
  ref_fn = _objective(_with(config, head="full"), model)
  # The detector sees the reference's full logits (so it would see them in the strategies under test too).
  assert _largest_logits(ref_fn, params, batches[0]) == ROWS * LENGTH
  ref = jax.jit(jax.value_and_grad(ref_fn, has_aux=True))
  return config, model, params, batches, [ref(params, b) for b in batches]


@pytest.mark.parametrize("head", ["gather", "chunked"])
def test_head_has_no_full_logits_and_is_exact(big, head):
  """Loss and gradients equal the full-logits ones; forward and backward hold at most one chunk of logits."""
  config, model, params, batches, refs = big
  fn = _objective(_with(config, head=head, head_chunk=CHUNK, head_capacity=0.5, head_groups=ROWS), model)
  assert _largest_logits(jax.value_and_grad(fn, has_aux=True), params, batches[0]) <= ROWS * CHUNK, head
  run = jax.jit(jax.value_and_grad(fn, has_aux=True))
  for batch, ((ref, _), ref_g), overflow in zip(batches, refs, (1.0, 0.0)):
    (val, metrics), g = run(params, batch)
    # gather: the first batch overflows one row's buffer (exact chunked fallback), the second uses the buffers.
    assert float(metrics["head_overflow"]) == (overflow if head == "gather" else 0.0)
    np.testing.assert_allclose(val, ref, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, ref_g)


def test_numerators_are_additive_over_rows(big):
  """Numerators and denominators of two halves add up to the whole batch (what accumulation relies on)."""
  config, model, params, (batch, _), _ = big
  cfg = _with(config, lm_normalisation="answer", head="chunked")
  lm = dict(batch["lm"], answer_len=jnp.array([64.0, 50.0, 30.0]))
  whole = {"lm": lm, "mmu": batch["mmu"]}
  parts = [{"lm": jax.tree.map(lambda x: x[:2], lm)}, {"lm": jax.tree.map(lambda x: x[2:], lm), "mmu": batch["mmu"]}]
  run = jax.jit(lambda b: losses.loss_terms(params, b, model=model, config=cfg)[0])
  whole_terms, part_terms = run(whole), [run(p) for p in parts]
  for t in losses.TASKS:
    nums, dens = whole_terms[t]
    split_n = sum(float(pt[t][0]) for pt in part_terms)
    split_d = sum(float(pt[t][1]) for pt in part_terms)
    np.testing.assert_allclose(split_n, nums, rtol=1e-5)
    assert split_d == float(dens)


def test_empty_and_absent_tasks(big):
  config, model, params, (batch, _), _ = big
  empty = jax.tree.map(lambda x: x[:0], batch["mmu"])
  for b in ({"lm": batch["lm"]}, {"lm": batch["lm"], "mmu": empty}):
    terms, _ = terms_of(params, b, model=model, config=_with(config, head="chunked"))
    assert float(terms["mmu"][0]) == 0 and float(terms["mmu"][1]) == 0 and float(terms["t2i"][1]) == 0
    assert np.isfinite(float(losses.combine(terms, config)))
    np.testing.assert_allclose(losses.combine(terms, config), config.loss.coeff_lm * terms["lm"][0] / terms["lm"][1],
                               rtol=1e-6)
  nothing = losses.loss_terms(params, {"mmu": empty}, model=model, config=config)[0]  # 0 rows in all: no model run
  assert all(float(n) == 0 and float(d) == 0 for n, d in nothing.values())
  assert float(losses.combine(nothing, config)) == 0
  with pytest.raises(ValueError, match="none of the tasks"):
    losses.loss_terms(params, {}, model=model, config=config)
  with pytest.raises(KeyError, match="p_mask"):
    losses.loss_terms(params, {"lm": {k: v for k, v in batch["lm"].items() if k != "p_mask"}}, model=model,
                      config=config)


def test_combine_applies_coefficients():
  config = config_lib.get_base_config()
  terms = {"t2i": (jnp.float32(6.0), jnp.float32(3.0)), "lm": (jnp.float32(10.0), jnp.float32(5.0)),
           "mmu": (jnp.float32(0.0), jnp.float32(0.0))}
  assert float(losses.combine(terms, config)) == pytest.approx(1.0 * 2.0 + 0.1 * 2.0)


# ----------------------------------------------------------------------------------------------------------------------
# End to end from clean layouts


def clean_batch(config, rows: int = 2) -> dict:
  p = prompting.Prompter(vocab_lib.Vocab.from_config(config.vocab), int(config.data.max_text_len),
                         int(config.vocab.num_image_tokens))
  rng = np.random.default_rng(1)
  v = p.vocab
  text = lambda n: list(rng.integers(0, 200, size=n))
  codes = lambda: rng.integers(0, v.codebook_size, size=p.num_image_tokens)
  t2i = prompting.stack([p.t2i(text(3 + i), codes()) for i in range(rows)])
  chat = [v.start_header_id, 5, v.end_header_id, 7, 8, v.eot_id, v.start_header_id, 6, v.end_header_id]
  lm = prompting.stack([p.lm_chat(text(20)), p.lm_chat(chat + text(10))][:rows])
  mmu = prompting.stack([p.mmu(codes(), chat + text(4 + i)) for i in range(rows)])
  return jax.tree.map(jnp.asarray, {"t2i": t2i, "lm": lm, "mmu": mmu})


def test_loss_fn_and_objective_hooks():
  """loss_fn from clean layouts is deterministic and finite; the train-step hooks give the same total."""
  config = config_lib.load_config(str(TINY))
  config.unlock()
  config.loss.lm_normalisation, config.loss.head = "answer", "full"  # head strategies are tested above
  model = llada.build_model(config.model)
  params = llada.init_params(model, jax.random.key(3))
  batch = clean_batch(config)
  obj = losses.Objective(config, model)

  @jax.jit
  def both(p, b, k):
    terms, metrics = losses.loss_fn(p, b, k, model=model, config=config)
    corrupted = obj.corrupt(b, k)
    nums, aux = obj.numerators(p, corrupted)
    dens = obj.denominators(corrupted)
    hooks_total = sum(obj.coefficients[t] * nums[t] / dens[t] for t in losses.TASKS)
    return terms, metrics, losses.combine(terms, config), hooks_total, aux

  key = jax.random.key(7)
  terms, metrics, total, hooks_total, aux = both(params, batch, key)
  again = both(params, batch, key)[0]
  assert ratios(terms) == ratios(again)
  assert np.isfinite(float(total)) and float(total) > 0
  for t in losses.TASKS:
    assert float(terms[t][1]) > 0 and float(metrics[f"masked_tokens_{t}"]) >= 1
  np.testing.assert_allclose(hooks_total, total, rtol=1e-6)
  assert float(aux["masked_tokens_t2i"]) == float(metrics["masked_tokens_t2i"])


def test_shorter_lm_rows_get_their_own_forward_pass():
  """`data.lm_seq_len`: lm rows shorter than L. Each task's numerator equals the one of that task alone (rows never
  attend across rows), the loss is differentiable, and t2i / mmu rows of different lengths are refused."""
  config = config_lib.load_config(str(TINY))
  config.unlock()
  config.loss.lm_normalisation, config.loss.head, config.loss.attention = "answer", "full", "pair_mask"
  model = llada.build_model(config.model)
  params = llada.init_params(model, jax.random.key(3))
  full = clean_batch(config)
  short = 24
  p = prompting.Prompter(vocab_lib.Vocab.from_config(config.vocab), int(config.data.max_text_len),
                         int(config.vocab.num_image_tokens))
  v = p.vocab
  chat = [v.start_header_id, 5, v.end_header_id, 7, 8, v.eot_id, v.start_header_id, 6, v.end_header_id, 9, 10]
  lm = jax.tree.map(jnp.asarray, prompting.stack([p.lm_chat(chat + [11, 12], short), p.lm_chat(chat, short)]))
  assert lm["input_ids"].shape == (2, short) and full["t2i"]["input_ids"].shape[1] > short
  batch = {"t2i": full["t2i"], "lm": lm, "mmu": full["mmu"]}
  obj = losses.Objective(config, model)
  corrupted = jax.jit(obj.corrupt)(batch, jax.random.key(5))
  nums, aux = jax.jit(obj.numerators)(params, corrupted)
  for task in losses.TASKS:
    alone, alone_aux = jax.jit(obj.numerators)(params, {task: corrupted[task]})
    np.testing.assert_allclose(nums[task], alone[task], rtol=1e-6)
    assert float(aux[f"loss_tokens_{task}"]) == float(alone_aux[f"loss_tokens_{task}"])
  assert float(aux["loss_tokens_lm"]) > 0 and float(nums["lm"]) > 0
  assert float(obj.denominators(corrupted)["lm"]) == 2.0
  grads = jax.grad(lambda q: losses.combine(losses.loss_terms(q, corrupted, model=model, config=config)[0],
                                            config))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  cut = dict(corrupted, mmu=jax.tree.map(lambda x: x[:, :short] if x.ndim == 2 else x, corrupted["mmu"]))
  with pytest.raises(ValueError, match="t2i and mmu rows must have the same length"):
    obj.numerators(params, cut)
