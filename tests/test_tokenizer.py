"""Text tokenizer: the trained ToyWorld tokenizer, loading tokenizer.json, the official chat / CoT formats."""

import hashlib
import json
import subprocess
import sys

import pytest

from mmada_jax import config as config_lib
from mmada_jax.data import toyworld
from mmada_jax.tokens import text_tokenizer as tt
from mmada_jax.tokens import vocab as vocab_lib


@pytest.fixture(scope="module")
def toy():
  vocab = vocab_lib.Vocab.from_config(vocab_lib.apply_toy_vocab(config_lib.get_base_config()).vocab)
  return vocab, toyworld.toy_tokenizer(vocab, num_records=300)


def test_special_tokens_sit_at_config_ids(toy):
  vocab, tok = toy
  assert len(tok) == vocab.text_vocab_size == 512
  assert tok.token_to_id("<|start_header_id|>") == vocab.start_header_id
  assert tok.token_to_id("<|end_header_id|>") == vocab.end_header_id
  assert tok.token_to_id("<|eot_id|>") == vocab.eot_id
  assert tok.token_to_id("<|mdm_mask|>") == vocab.mask_id
  for field, name in vocab_lib.SPECIAL_TOKEN_NAMES.items():
    assert tok.token_to_id(name) == getattr(vocab, field), field
  # Ordinary tokens never land on special ids; every id below text_vocab_size has a token.
  assert all(tok.id_to_token(i) is not None for i in range(vocab.text_vocab_size))
  ids = tok.encode("a red circle at the top left. 12+7=19")
  assert not vocab.is_special(ids).any() and max(ids) < vocab.text_vocab_size


def test_encode_decode_round_trip_and_markers(toy):
  vocab, tok = toy
  text = tt.mmu_text("How many circles?", tt.cot_answer("1+1=2", "2", vocab), vocab, literal_eot=False, cot=True)
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert ids.count(vocab.end_header_id) == 2 and ids.count(vocab.eot_id) == 1
  assert tok.token_to_id("<think>") in ids and tok.token_to_id("</think>") in ids  # single tokens
  assert tok.encode("<think>")[0] not in vocab.special_ids()
  assert tok.decode(tok.encode("héllo ☃ 42")) == "héllo ☃ 42"  # byte-level: no unknown token
  assert tok.encode("7") + tok.encode("3") == tok.encode("73")  # one digit per token
  # The literal <eot_id> of the official mmu prompts is ordinary text, not the special token.
  assert vocab.eot_id not in tok.encode(tt.LITERAL_EOT)
  assert tok.decode(ids + [vocab.image_offset + 3]) == text  # image ids are ignored by decode


def test_save_load_and_mismatch_errors(toy, tmp_path):
  vocab, tok = toy
  tok.save(str(tmp_path))
  again = tt.TextTokenizer.from_dir(str(tmp_path), vocab)
  s = "Ada has 3 red circles and gets 4 more."
  assert again.encode(s) == tok.encode(s)
  moved = vocab_lib.Vocab.from_config(dict(vocab_lib.toy_vocab_values(), eot_id=3, pad_id=496))
  with pytest.raises(ValueError, match=r"'<\|eot_id\|>' has id 511, config vocab.eot_id=3"):
    tt.TextTokenizer.from_dir(str(tmp_path), moved)
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tt.TextTokenizer.from_dir(str(tmp_path / "missing"), vocab)
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
    tt.TextTokenizer.from_dir(str(tmp_path / "bad"), vocab)
  cfg = vocab_lib.apply_toy_vocab(config_lib.get_base_config())
  cfg.data.tokenizer_dir = str(tmp_path)
  assert tt.TextTokenizer.from_config(cfg).encode(s) == tok.encode(s)


def test_official_layout_tokenizer_file_loads(tmp_path):
  """A tokenizer.json with the official 8B ids (header tokens 126346-126348, mask 126336) loads with the base config."""
  vocab = vocab_lib.Vocab.from_config(config_lib.get_base_config().vocab)
  words = {f"w{i}": i for i in range(126349)}
  specials = {126336: "<|mdm_mask|>", 126346: "<|start_header_id|>", 126347: "<|end_header_id|>",
              126348: "<|eot_id|>", 126080: "<|startoftext|>", 126081: "<|endoftext|>"}
  for i, s in specials.items():
    del words[f"w{i}"]
    words[s] = i
  spec = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
          "pre_tokenizer": {"type": "WhitespaceSplit"}, "decoder": None,
          "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, s in specials.items()],
          "model": {"type": "WordLevel", "vocab": words, "unk_token": "w0"}}
  (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
  tok = tt.TextTokenizer.from_dir(str(tmp_path), vocab)
  text = tt.chat_text([{"role": "user", "content": "w5 w6"}], vocab, add_generation_prompt=True)
  assert tok.encode(text) == [126346, 0, 126347, 5, 6, 126348, 126346, 0, 126347]  # 'user' is unknown -> w0
  assert len(tok) == 126349


def test_chat_and_cot_formats_are_the_official_strings():
  vocab = vocab_lib.Vocab.from_config(config_lib.get_base_config().vocab)
  msgs = [{"role": "user", "content": "  Hi there \n"}, {"role": "assistant", "content": "Hello"}]
  assert tt.chat_text(msgs, vocab) == ("<|start_header_id|>user<|end_header_id|>\nHi there<|eot_id|>"
                                       "<|start_header_id|>assistant<|end_header_id|>\nHello<|eot_id|>")
  assert tt.chat_text(msgs[:1], vocab, add_generation_prompt=True).endswith(
      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n")
  # mmada-official.md §3.5: training prompts use the literal '<eot_id>' by default.
  assert tt.mmu_text("Q?", "A", vocab) == ("<|start_header_id|>user<|end_header_id|>\nQ?<eot_id>"
                                           "<|start_header_id|>assistant<|end_header_id|>\nA")
  assert "Q?<|eot_id|>" in tt.mmu_text("Q?", "A", vocab, literal_eot=False)
  cot = tt.mmu_text("Q?", "A", vocab, cot=True)
  assert cot.startswith("<|start_header_id|>user<|end_header_id|>\nYou should first think about the reasoning process "
                        "in the mind and then provide the user with the answer. The reasoning process is enclosed "
                        "within <think> </think> tags, i.e. <think> reasoning process here </think> answer here\nQ?\n"
                        "<eot_id>")
  assert tt.split_cot_answer(tt.cot_answer("2+1=3", " 3", vocab), vocab) == ("2+1=3", "3")
  assert tt.split_cot_answer("3", vocab) == (None, "3")
  with pytest.raises(ValueError, match="message 0"):
    tt.chat_text([{"content": "x"}], vocab)


def test_training_is_deterministic_across_processes():
  code = ("import hashlib\nfrom mmada_jax import config as C\nfrom mmada_jax.tokens import vocab as V\n"
          "from mmada_jax.data import toyworld as tw\n"
          "v = V.Vocab.from_config(V.apply_toy_vocab(C.get_base_config()).vocab)\n"
          "print(hashlib.sha256(tw.toy_tokenizer(v, num_records=200).tokenizer.to_str().encode()).hexdigest())\n")
  digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
             for _ in range(2)}
  assert len(digests) == 1
  vocab = vocab_lib.Vocab.from_config(vocab_lib.apply_toy_vocab(config_lib.get_base_config()).vocab)
  here = hashlib.sha256(toyworld.toy_tokenizer(vocab, num_records=200).tokenizer.to_str().encode()).hexdigest()
  assert digests == {here + "\n"}
