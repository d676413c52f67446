"""Sequence layouts against mmada-official.md §3 and the official batch in the parity fixture loss_A.npz."""

import numpy as np
import pytest

from mmada_jax import config as config_lib
from mmada_jax.tokens import prompting
from mmada_jax.tokens import vocab as vocab_lib

IGN = prompting.IGNORE_ID
OFFICIAL = vocab_lib.Vocab.from_config(config_lib.get_base_config().vocab)


def make(s, n, **kw):
  return prompting.Prompter(OFFICIAL, max_text_len=s, num_image_tokens=n, **kw)


def codes(n, seed=0):
  return np.random.default_rng(seed).integers(0, OFFICIAL.codebook_size, n)


def test_from_config_and_lengths():
  assert prompting.Prompter.from_config(config_lib.get_base_config()).seq_len == 387
  for s, n, want in ((512, 1024, 1539), (128, 256, 387), (256, 256, 515)):
    p = make(s, n)
    outs = [p.t2i([5, 6], codes(n)), p.t2i_gen([5]), p.lm([5, 6]), p.lm_chat([5]), p.mmu(codes(n), [5]),
            p.r2i(codes(n), [7])]
    for out in outs:
      for key, arr in out.items():
        assert arr.shape == (want,), (s, n, key)
        assert arr.dtype == np.int32


def test_t2i_positions_padding_and_labels():
  v, s, n = OFFICIAL, 512, 1024
  p = make(s, n)
  text, img = [11, 12, 13], codes(n)
  out = p.t2i(text, img)
  ids, labels = out["input_ids"], out["labels"]
  n_pad = s + 1 - 6  # core = <|t2i|> BOS 3 text EOS
  np.testing.assert_array_equal(ids[:n_pad], v.ipad_id)  # left padding with [iPAD] 126093
  np.testing.assert_array_equal(ids[n_pad:s + 1], [v.t2i_id, v.bos_id, 11, 12, 13, v.eos_id])
  assert ids[s + 1] == v.soi_id == 126084 and ids[s + n + 2] == v.eoi_id == 126085
  np.testing.assert_array_equal(ids[s + 2:s + n + 2], img + 126349)  # image at [S+2, S+N+1] = 514..1537
  np.testing.assert_array_equal(labels[:n_pad], IGN)
  np.testing.assert_array_equal(labels[n_pad:], ids[n_pad:])  # <|soi|>/<|eoi|> labelled with themselves
  np.testing.assert_array_equal(out["valid_mask"], np.r_[np.zeros(n_pad), np.ones(s + n + 3 - n_pad)])
  np.testing.assert_array_equal(out["prompt_mask"][s + 2:s + n + 2], 0)
  assert out["prompt_mask"][:s + 2].all() and out["prompt_mask"][s + n + 2] == 1
  # BOS already present is not doubled; empty text gets a lone BOS.
  np.testing.assert_array_equal(p.t2i([v.bos_id] + text, img)["input_ids"], ids)
  assert list(p.t2i([], img)["input_ids"][s - 2:s + 1]) == [v.t2i_id, v.bos_id, v.eos_id]


def test_t2i_truncation_and_condition_dropout():
  v, s, n = OFFICIAL, 8, 4
  p = make(s, n)
  long_text = list(range(100, 120))
  ids = p.t2i(long_text, codes(n))["input_ids"]
  # core[:S] + [EOS]: <|t2i|> BOS 100..105 EOS, no padding
  np.testing.assert_array_equal(ids[:s + 1], [v.t2i_id, v.bos_id] + list(range(100, 106)) + [v.eos_id])
  out = p.t2i(long_text, codes(n), drop_condition=True)
  np.testing.assert_array_equal(out["input_ids"][:s + 1], [v.ipad_id] * 6 + [v.t2i_id, v.bos_id, v.eos_id])
  np.testing.assert_array_equal(out["valid_mask"][:6], 0)
  # Null prompt == CFG unconditional prompt of t2i_gen (§3.2).
  np.testing.assert_array_equal(p.t2i_gen([])["input_ids"][:s + 1], out["input_ids"][:s + 1])
  rng = np.random.default_rng(0)
  frac = np.mean([prompting.draw_cond_dropout(rng, 0.1) for _ in range(4000)])
  assert 0.085 < frac < 0.115


def test_t2i_gen_masks_every_image_slot():
  v, s, n = OFFICIAL, 128, 256
  out = make(s, n).t2i_gen([42])
  np.testing.assert_array_equal(out["input_ids"][s + 2:s + n + 2], v.mask_id)
  assert out["input_ids"][s + 1] == v.soi_id and out["input_ids"][-1] == v.eoi_id
  assert out["valid_mask"][:s + 1].sum() == 4  # <|t2i|> BOS 42 EOS


def test_lm_eos_padding_labels_and_truncation():
  v = OFFICIAL
  p = make(128, 256)
  out = p.lm([7, 8, 9], max_seq_len=10)
  np.testing.assert_array_equal(out["input_ids"], [v.bos_id, 7, 8, 9] + [v.eos_id] * 6)
  np.testing.assert_array_equal(out["labels"], out["input_ids"])  # padding is trained on (§3.3)
  np.testing.assert_array_equal(out["valid_mask"], 1)  # official quirk: mask built after padding
  np.testing.assert_array_equal(out["prompt_mask"], 0)
  np.testing.assert_array_equal(make(128, 256, valid_mask_all_ones=False).lm([7, 8, 9], 10)["valid_mask"],
                                [1] * 5 + [0] * 5)
  cut = p.lm(list(range(1, 20)), max_seq_len=6)["input_ids"]
  np.testing.assert_array_equal(cut, [v.bos_id, 1, 2, 3, 4, 5])  # cut without EOS
  assert p.lm([1])["input_ids"].shape == (387,)  # default length is L


def test_lm_chat_prompt_mask_to_last_end_header():
  v = OFFICIAL
  p = make(128, 256)
  sh, eh, eot = v.start_header_id, v.end_header_id, v.eot_id
  text = [sh, 1, eh, 2, 3, eot, sh, 4, eh, 5, 6]
  out = p.lm_chat(text, max_seq_len=16)
  # BOS at 0, last <|end_header_id|> at 9 -> positions 0..9 are prompt
  np.testing.assert_array_equal(out["prompt_mask"], [1] * 10 + [0] * 6)
  np.testing.assert_array_equal(out["labels"], out["input_ids"])
  np.testing.assert_array_equal(p.lm_chat([1, 2, 3], 8)["prompt_mask"], 0)
  # The header search runs on the cut sequence.
  np.testing.assert_array_equal(p.lm_chat(text, max_seq_len=6)["prompt_mask"], [1, 1, 1, 1, 0, 0])


def test_mmu_positions_labels_prompt_mask():
  v, s, n = OFFICIAL, 512, 1024
  p = make(s, n)
  img = codes(n, 3)
  text = [v.start_header_id, 1, v.end_header_id, 2, 3, v.eot_id, v.start_header_id, 4, v.end_header_id, 5, 6]
  out = p.mmu(img, text)
  ids = out["input_ids"]
  assert ids[0] == v.mmu_id and ids[1] == v.soi_id and ids[n + 2] == v.eoi_id
  np.testing.assert_array_equal(ids[2:n + 2], img + v.image_offset)
  np.testing.assert_array_equal(ids[n + 3:n + 3 + 14], [v.bos_id] + text + [v.eos_id, v.eos_id])
  np.testing.assert_array_equal(ids[n + 3 + 13:], v.eos_id)  # right padding with EOS to S
  np.testing.assert_array_equal(out["labels"][:n + 3], IGN)
  np.testing.assert_array_equal(out["labels"][n + 3:], ids[n + 3:])
  p_end = n + 3 + 9  # last <|end_header_id|> is text position 9 (after BOS)
  np.testing.assert_array_equal(out["prompt_mask"], np.r_[np.ones(p_end + 1), np.zeros(s + n + 3 - p_end - 1)])
  np.testing.assert_array_equal(out["valid_mask"], 1)
  real = make(s, n, valid_mask_all_ones=False).mmu(img, text)["valid_mask"]
  assert real.sum() == n + 3 + 13
  # No header: only <|mmu|> <|soi|> image <|eoi|> are prompt.
  assert p.mmu(img, [1, 2])["prompt_mask"].sum() == n + 3


def test_mmu_truncation_and_inference_prompt():
  v, s, n = OFFICIAL, 6, 4
  p = make(s, n)
  img = codes(n)
  ids = p.mmu(img, list(range(10, 30)))["input_ids"]
  np.testing.assert_array_equal(ids[n + 3:], [v.bos_id, 10, 11, 12, 13, v.eos_id])  # text[:S-1] + [EOS]
  gen = p.mmu_gen(img, [1, 2, 3])
  np.testing.assert_array_equal(gen["input_ids"], np.r_[[v.mmu_id, v.soi_id], img + v.image_offset,
                                                        [v.eoi_id, v.bos_id, 1, 2, 3]])
  assert gen["prompt_mask"].all() and len(gen["input_ids"]) == n + 3 + 4
  with pytest.raises(ValueError, match="expected 4 image codes"):
    p.mmu(codes(5), [1])


def test_r2i_layout():
  v, s, n = OFFICIAL, 8, 4
  p = make(s, n)
  img = codes(n)
  text = [v.start_header_id, 1, v.end_header_id, 2, 3]
  out = p.r2i(img, text)
  ids = out["input_ids"]
  np.testing.assert_array_equal(ids[:s + 1], [v.r2i_id, v.bos_id] + text + [v.eos_id, v.eos_id])
  assert ids[s + 1] == v.soi_id and ids[-1] == v.eoi_id
  np.testing.assert_array_equal(ids[s + 2:s + 2 + n], img + v.image_offset)
  # task token, BOS..<|end_header_id|> (text pos 3 -> seq pos 4), <|soi|>, <|eoi|>
  want = np.zeros(s + n + 3)
  want[[0, 1, 2, 3, 4, s + 1, s + n + 2]] = 1
  np.testing.assert_array_equal(out["prompt_mask"], want)
  np.testing.assert_array_equal(out["labels"], ids)


def fixture_vocab(end_header_id=200):
  """Ids of the parity fixture's tiny vocabulary (docs/parity.md §2); other specials are free ids."""
  others = [i for i in range(200, 228) if i != end_header_id]
  values = dict(text_vocab_size=236, llm_vocab_size=236, codebook_size=64, image_offset=236, num_image_tokens=14,
                bos_id=228, eos_id=229, pad_id=229, mask_id=230, t2i_id=231, soi_id=232, eoi_id=233, mmu_id=234,
                ipad_id=235, end_header_id=end_header_id)
  for field, i in zip(("sov_id", "eov_id", "t2v_id", "v2v_id", "lvg_id", "r2i_id", "start_header_id", "eot_id"),
                      others):
    values[field] = i
  return vocab_lib.Vocab.from_config(values)


def test_matches_official_batch_of_parity_fixture(parity_path):
  """loss_A.npz rows: t2i (S=7, N=14), two lm rows (L=24), one mmu row (N=8, text 13)."""
  d = np.load(parity_path / "loss_A.npz")
  ids, labels, t2i_masks = d["input_ids"], d["labels"], d["t2i_masks"]
  assert int(d["max_seq_length"]) == 7
  v = fixture_vocab()
  p = prompting.Prompter(v, max_text_len=7, num_image_tokens=14)
  image_codes = np.where(labels[0, 9:23] >= 0, labels[0, 9:23], ids[0, 9:23]) - 236
  out = p.t2i([160, 83, 160], image_codes, image_mask=ids[0, 9:23] == v.mask_id)
  np.testing.assert_array_equal(out["input_ids"], ids[0])
  np.testing.assert_array_equal(out["labels"], labels[0])
  np.testing.assert_array_equal(out["valid_mask"], t2i_masks[0])
  for row in (1, 2):
    text = labels[row][1:list(labels[row]).index(229)]
    out = p.lm(text, max_seq_len=24)
    np.testing.assert_array_equal(out["input_ids"], labels[row])  # clean ids
    np.testing.assert_array_equal(out["labels"], labels[row])
  # lm_chat: the fixture's SFT answer lengths (19, 20) follow from a header at positions 4 and 3.
  for row, header_pos, answer_len in ((1, 4, 19), (2, 3, 20)):
    pv = prompting.Prompter(fixture_vocab(end_header_id=int(labels[row][header_pos])), 7, 14)
    text = labels[row][1:list(labels[row]).index(229)]
    assert (1 - pv.lm_chat(text, max_seq_len=24)["prompt_mask"]).sum() == answer_len
  # mmu: N=8 image tokens, S=13 text positions; the question ends with id 227, treated as the end header here.
  pm = prompting.Prompter(fixture_vocab(end_header_id=227), max_text_len=13, num_image_tokens=8)
  out = pm.mmu(ids[3, 2:10] - 236, labels[3, 12:23])
  np.testing.assert_array_equal(out["labels"], labels[3])
  clean = np.where(labels[3] >= 0, labels[3], ids[3])
  np.testing.assert_array_equal(out["input_ids"], clean)
  assert (1 - out["prompt_mask"]).sum() == d["answer_lengths"][0, 0] == 8
  assert np.all(ids[3][out["prompt_mask"] == 1] != v.mask_id)  # the official corruption never touched the prompt


def test_stack():
  p = make(8, 4)
  batch = prompting.stack([p.lm([1]), p.lm([2, 3])])
  assert batch["input_ids"].shape == (2, 15)
  with pytest.raises(ValueError, match="keys"):
    prompting.stack([p.lm([1]), p.t2i_gen([1])])
