"""Parity with the official PyTorch backbone on every fixture set found in the parity directory.

A set `backbone_<C>` is `backbone_<C>.safetensors` + `backbone_<C>_config.json` + `backbone_<C>_io.npz`
(docs/parity.md §1-§5). Everything is driven by the set's own config, so sets with other sizes, head
counts, rope theta or vocabularies run unchanged.
"""

import json
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import parity_dir
from mmada_jax import checkpoint as ckpt
from mmada_jax.convert import official
from mmada_jax.models import llada

TOL = 1e-4


def backbone_sets() -> list[str]:
  d = parity_dir()
  stems = sorted(p.stem for p in d.glob("backbone_*.safetensors"))
  return [s for s in stems if (d / f"{s}_config.json").exists() and (d / f"{s}_io.npz").exists()]


def test_parity_sets_exist():
  assert backbone_sets(), f"no backbone fixture set found in {parity_dir()} (set MMADA_PARITY_DIR)"


def official_dir(stem: str, tmp: pathlib.Path) -> pathlib.Path:
  """Lays a fixture set out as a Hugging Face checkpoint directory."""
  src = tmp / "official"
  src.mkdir()
  shutil.copyfile(parity_dir() / f"{stem}.safetensors", src / "model.safetensors")
  shutil.copyfile(parity_dir() / f"{stem}_config.json", src / "config.json")
  return src


@pytest.fixture(scope="module", params=backbone_sets() or ["none"])
def converted(request, tmp_path_factory):
  stem = request.param
  if stem == "none":
    pytest.fail(f"no backbone fixture set found in {parity_dir()}")
  tmp = tmp_path_factory.mktemp(stem)
  src = official_dir(stem, tmp)
  out = {}
  for layout in ("stacked", "unstacked"):
    official.import_official(str(src), str(tmp / layout), layout=layout, log=lambda s: None)
    out[layout] = ckpt.load_params(str(tmp / layout), as_numpy=True)
  cfg = json.loads((src / "config.json").read_text())
  return stem, src, tmp, out, cfg, np.load(parity_dir() / f"{stem}_io.npz")


def _model(meta, layout):
  m = official.model_config_for(official.Shape(**meta["model"]))
  m.scan_layers = layout == "stacked"
  return llada.build_model(m)


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_logits_and_hidden_states(converted, layout):
  stem, _, _, out, _, io = converted
  params, meta = out[layout]
  model = _model(meta, layout)
  ids = jnp.asarray(io["input_ids"])
  res = model.apply({"params": params}, ids, output="all")
  np.testing.assert_allclose(res["logits"], io["logits_nomask"], atol=TOL, rtol=0, err_msg=f"{stem} no mask")
  np.testing.assert_allclose(res["hidden_states"], io["hidden_states_nomask"], atol=TOL, rtol=0,
                             err_msg=f"{stem} hidden states")
  # Boolean pair mask (MMaDA's samplers), given as the pair mask and as the padding mask it is built from. Padded
  # query rows are comparable too: disallowed pairs get the most negative finite float, as in the official code.
  for mask in (io["attention_bias"], io["attention_mask"]):
    logits = model.apply({"params": params}, ids, jnp.asarray(mask))
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_allclose(logits, io["logits_attention_bias"], atol=TOL, rtol=0, err_msg=f"{stem} bool mask")
  if "logits_float01_bias" in io:  # the float bias of `forward_process`: added, masks nothing
    logits = model.apply({"params": params}, ids, jnp.asarray(io["attention_bias"].astype(np.float32)))
    np.testing.assert_allclose(logits, io["logits_float01_bias"], atol=TOL, rtol=0, err_msg=f"{stem} float bias")


def test_logits_at_selected_positions(converted):
  _, _, _, out, _, io = converted
  params, meta = out["stacked"]
  model = _model(meta, "stacked")
  ids = jnp.asarray(io["input_ids"])
  rng = np.random.default_rng(0)
  at = jnp.asarray(rng.integers(0, ids.shape[1], size=(ids.shape[0], 5)))
  sel = model.apply({"params": params}, ids, logits_at=at)
  assert sel.shape == (ids.shape[0], 5, meta["model"]["vocab_size"])
  expected = np.take_along_axis(io["logits_nomask"], np.asarray(at)[..., None], axis=1)
  np.testing.assert_allclose(sel, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_round_trip_is_byte_identical(converted, layout):
  _, src, tmp, _, _, _ = converted
  dst = tmp / f"export_{layout}"
  official.export_official(str(tmp / layout), str(dst), log=lambda s: None)
  assert sorted(os.listdir(dst)) == sorted(os.listdir(src))
  for name in os.listdir(src):
    assert (dst / name).read_bytes() == (src / name).read_bytes(), name
