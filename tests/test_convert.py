"""Converter: bf16 stays bf16, sharded checkpoints, and every kind of wrong input is named."""

import json
import os
import pathlib
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import FIXTURES
from mmada_jax import checkpoint as ckpt, cli, config as config_lib
from mmada_jax.convert import official, safetensors_io as st

SET = FIXTURES / "parity"
ROOT = pathlib.Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda s: None)


def tensors():
  f = st.SafetensorsFile(str(SET / "backbone_A.safetensors"))
  return {k: np.array(f.get(k)) for k in f.tensors}


def make_dir(tmp: pathlib.Path, sd: dict, cfg_changes: dict | None = None, name="src", shards=1):
  d = tmp / name
  d.mkdir()
  cfg = json.loads((SET / "backbone_A_config.json").read_text())
  cfg.update(cfg_changes or {})
  (d / "config.json").write_text(json.dumps(cfg))
  specs = {k: (v.shape, v.dtype) for k, v in sd.items()}
  order = st.canonical_order(specs)
  if shards == 1:
    st.write_file(str(d / "model.safetensors"), order, specs, sd.__getitem__)
    return d
  weight_map = {}
  for i in range(shards):
    part = order[i::shards]
    name_i = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    st.write_file(str(d / name_i), part, specs, sd.__getitem__, {"format": "pt"})
    weight_map.update({k: name_i for k in part})
  (d / st.INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}, indent=2))
  return d


def assert_same_dir(a: pathlib.Path, b: pathlib.Path):
  assert sorted(os.listdir(a)) == sorted(os.listdir(b))
  for n in os.listdir(a):
    assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_bf16_stays_bf16_and_round_trips(tmp_path):
  sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors().items()}
  src = make_dir(tmp_path, sd)
  official.import_official(str(src), str(tmp_path / "ck"), **QUIET)
  params, meta = ckpt.load_params(str(tmp_path / "ck"), as_numpy=True)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
  assert meta["dtypes"] == ["BF16"]
  official.export_official(str(tmp_path / "ck"), str(tmp_path / "out"), **QUIET)
  assert_same_dir(src, tmp_path / "out")


def test_sharded_index_round_trip(tmp_path):
  src = make_dir(tmp_path, tensors(), shards=3)
  for layout in ("stacked", "unstacked"):
    official.import_official(str(src), str(tmp_path / layout), layout=layout, **QUIET)
    official.export_official(str(tmp_path / layout), str(tmp_path / f"out_{layout}"), **QUIET)
    assert_same_dir(src, tmp_path / f"out_{layout}")


def test_missing_and_unexpected_keys_are_listed(tmp_path):
  sd = tensors()
  del sd["model.transformer.blocks.1.up_proj.weight"]
  sd["model.transformer.blocks.1.extra.weight"] = np.zeros(3, np.float32)
  src = make_dir(tmp_path, sd)
  with pytest.raises(official.ConversionError) as e:
    official.import_official(str(src), str(tmp_path / "ck"), **QUIET)
  msg = str(e.value)
  assert "missing keys (1): ['model.transformer.blocks.1.up_proj.weight']" in msg
  assert "unexpected keys (1): ['model.transformer.blocks.1.extra.weight']" in msg
  assert not (tmp_path / "ck").exists()


def test_shape_mismatch_names_key_and_shapes(tmp_path):
  sd = tensors()
  sd["model.transformer.blocks.0.ff_proj.weight"] = np.zeros((191, 64), np.float32)
  src = make_dir(tmp_path, sd)
  with pytest.raises(official.ConversionError,
                     match=r"blocks.0.ff_proj.weight: checkpoint shape \[191, 64\], the config implies \[192, 64\]"):
    official.import_official(str(src), str(tmp_path / "ck"), **QUIET)


def test_config_contradicting_weights_is_named(tmp_path):
  src = make_dir(tmp_path, tensors())
  cfg = config_lib.load_config(str(ROOT / "experiments" / "tiny.py"),
                               {"model.num_layers": "3", "model.vocab_size": "320"})
  with pytest.raises(official.ConversionError) as e:
    official.import_official(str(src), str(tmp_path / "ck"), model_config=cfg.model, **QUIET)
  assert "model.num_layers=3 but" in str(e.value) and "n_layers=2" in str(e.value)
  assert "model.vocab_size=320" in str(e.value)
  cfg = config_lib.load_config(str(ROOT / "experiments" / "tiny.py"),
                               {"model.num_heads": "8", "model.num_kv_heads": "8"})
  with pytest.raises(official.ConversionError, match="model.num_heads=8 but .* has n_heads=4"):
    official.import_official(str(src), str(tmp_path / "ck"), model_config=cfg.model, **QUIET)


def test_unsupported_architecture_flag(tmp_path):
  src = make_dir(tmp_path, tensors(), {"block_type": "sequential"})
  with pytest.raises(official.ConversionError, match="block_type='sequential'"):
    official.import_official(str(src), str(tmp_path / "ck"), **QUIET)


def test_truncated_file_is_detected(tmp_path):
  src = make_dir(tmp_path, tensors())
  data = (src / "model.safetensors").read_bytes()
  (src / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(st.SafetensorsError, match="beyond the file size"):
    official.import_official(str(src), str(tmp_path / "ck"), **QUIET)


def test_existing_output_is_never_overwritten(tmp_path):
  src = make_dir(tmp_path, tensors())
  official.import_official(str(src), str(tmp_path / "ck"), **QUIET)
  before = sorted(p.name for p in (tmp_path / "ck").rglob("*"))
  with pytest.raises(ckpt.CheckpointError, match="refusing to overwrite"):
    official.import_official(str(src), str(tmp_path / "ck"), **QUIET)
  assert sorted(p.name for p in (tmp_path / "ck").rglob("*")) == before
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("x")
  with pytest.raises(official.ConversionError, match="not empty"):
    official.export_official(str(tmp_path / "ck"), str(tmp_path / "out"), **QUIET)


def test_metadata_mismatch_on_load(tmp_path):
  src = make_dir(tmp_path, tensors())
  official.import_official(str(src), str(tmp_path / "ck"), layout="unstacked", **QUIET)
  with pytest.raises(ckpt.CheckpointError, match="layer_layout: checkpoint has 'unstacked', expected 'stacked'"):
    ckpt.load_params(str(tmp_path / "ck"), expected={"layer_layout": "stacked"})
  with pytest.raises(ckpt.CheckpointError, match="model.vocab_size: checkpoint has 300, expected 134656"):
    ckpt.load_params(str(tmp_path / "ck"), expected={"model.vocab_size": 134656})


def test_cli_convert_both_ways(tmp_path, capsys):
  src = make_dir(tmp_path, tensors())
  assert cli.main(["convert", str(src), str(tmp_path / "ck"), "--config", str(ROOT / "experiments" / "tiny.py"),
                   "--layout", "unstacked"]) == 0
  assert ckpt.read_metadata(str(tmp_path / "ck"))["layer_layout"] == "unstacked"
  assert ckpt.read_metadata(str(tmp_path / "ck"))["vocab"]["image_offset"] == 236
  assert cli.main(["convert", str(tmp_path / "ck"), str(tmp_path / "out")]) == 0
  assert_same_dir(src, tmp_path / "out")
  assert cli.main(["convert", str(src), str(tmp_path / "ck2"), "--config", str(ROOT / "experiments" / "tiny.py"),
                   "--config.model.num_layers=3"]) == 1
  assert "model.num_layers=3" in capsys.readouterr().err


def test_cli_info(capsys):
  assert cli.main(["info", "--config", str(ROOT / "experiments" / "mmada_8b.py")]) == 0
  assert "parameters: 8,082,690,048" in capsys.readouterr().out
  assert cli.main(["info", "--config", str(ROOT / "experiments" / "llada_8b.py")]) == 0
  assert "parameters: 8,015,581,184" in capsys.readouterr().out


def test_resize_vocab_for_stage_1_1(tmp_path):
  src = make_dir(tmp_path, tensors())
  cfg = config_lib.load_config(str(ROOT / "experiments" / "tiny.py"), {"model.vocab_size": "320"})
  official.import_official(str(src), str(tmp_path / "ck"), model_config=cfg.model, resize_to=320, **QUIET)
  params, meta = ckpt.load_params(str(tmp_path / "ck"), as_numpy=True)
  old = tensors()
  assert params["wte"].shape == (320, 64) and params["lm_head"]["kernel"].shape == (64, 320)
  np.testing.assert_array_equal(params["wte"][:300], old["model.transformer.wte.weight"])
  np.testing.assert_allclose(params["wte"][300:], np.broadcast_to(old["model.transformer.wte.weight"].mean(0),
                                                                  (20, 64)), rtol=1e-6)
  assert meta["model"]["vocab_size"] == 320 and meta["official"] is None
  official.export_official(str(tmp_path / "ck"), str(tmp_path / "out"), **QUIET)
  back = json.loads((tmp_path / "out" / "config.json").read_text())
  assert back["embedding_size"] == 320 and back["n_layers"] == 2
  f = st.CheckpointDir(str(tmp_path / "out"))
  assert f.info("model.transformer.ff_out.weight").shape == (320, 64)


def test_cli_convert_magvit_both_ways(tmp_path):
  src = tmp_path / "magvit"
  src.mkdir()
  shutil.copyfile(SET / "magvit_tiny.safetensors", src / "model.safetensors")
  assert cli.main(["convert", str(src), str(tmp_path / "ck")]) == 0
  assert ckpt.read_metadata(str(tmp_path / "ck"))["kind"] == "magvit"
  assert cli.main(["convert", str(tmp_path / "ck"), str(tmp_path / "out")]) == 0
  written = [p for p in (tmp_path / "out").iterdir() if p.suffix == ".safetensors"]
  assert len(written) == 1 and written[0].read_bytes() == (SET / "magvit_tiny.safetensors").read_bytes()
  # a bare file works too
  assert cli.main(["convert", str(SET / "magvit_tiny.safetensors"), str(tmp_path / "ck2")]) == 0
