"""Vocab: ids from config, image id <-> code helpers, the toy layout."""

import numpy as np
import pytest

from mmada_jax import config as config_lib
from mmada_jax.tokens import vocab as vocab_lib


def test_official_ids_from_base_config():
  v = vocab_lib.Vocab.from_config(config_lib.get_base_config().vocab)
  # mmada-official.md §0.1
  assert (v.mask_id, v.bos_id, v.eos_id, v.pad_id) == (126336, 126080, 126081, 126081)
  assert (v.soi_id, v.eoi_id, v.t2i_id, v.mmu_id, v.ipad_id, v.r2i_id) == (126084, 126085, 126088, 126089, 126093,
                                                                            126094)
  assert (v.start_header_id, v.end_header_id, v.eot_id) == (126346, 126347, 126348)
  assert v.image_offset == 126349 and v.image_end == 134541 and v.min_model_rows == 134541
  assert v.think_open == "<think>" and v.think_close == "</think>"


def test_image_id_round_trip_and_predicates():
  v = vocab_lib.Vocab.from_config(config_lib.get_base_config().vocab)
  codes = np.array([[0, 1, 8191], [5, 114, 115]])
  ids = v.image_ids(codes)
  assert ids[0, 0] == 126349 and ids[0, 2] == 134540
  np.testing.assert_array_equal(v.image_codes(ids), codes)
  assert v.is_image(ids).all() and not v.is_text(ids).any()
  probe = np.array([126348, 126349, 134540, 134541, 126336, 0])
  np.testing.assert_array_equal(v.is_image(probe), [False, True, True, False, False, False])
  np.testing.assert_array_equal(v.is_text(probe), [True, False, False, False, True, True])
  np.testing.assert_array_equal(v.is_special(probe), [True, False, False, False, True, False])
  with pytest.raises(ValueError, match="image codes"):
    v.image_ids(np.array([8192]))
  with pytest.raises(ValueError, match="not image ids"):
    v.image_codes(np.array([126336]))


def test_bad_vocab_is_rejected_with_names():
  values = dict(config_lib.get_base_config().vocab)
  values["soi_id"] = values["eoi_id"]
  with pytest.raises(ValueError, match="soi_id"):
    vocab_lib.Vocab.from_config(values)
  values = dict(config_lib.get_base_config().vocab)
  values["image_offset"] = 100
  with pytest.raises(ValueError, match="image_offset"):
    vocab_lib.Vocab.from_config(values)
  values = dict(config_lib.get_base_config().vocab, bogus=1)
  with pytest.raises(ValueError, match="bogus"):
    vocab_lib.Vocab.from_config(values)


def test_toy_vocab_layout_validates():
  cfg = vocab_lib.apply_toy_vocab(config_lib.get_base_config(), num_plain_tokens=495, codebook_size=64)
  config_lib.validate(cfg)
  v = vocab_lib.Vocab.from_config(cfg.vocab)
  assert v.text_vocab_size == 512 and v.image_offset == 512 and cfg.model.vocab_size == 576
  assert v.bos_id == 495 and v.eos_id == v.pad_id == 496 and v.eot_id == 511
  assert sorted(v.special_ids()) == list(range(495, 512))
  assert cfg.magvit.codebook_bits == 6
