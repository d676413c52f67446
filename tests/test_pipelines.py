"""grain pipelines and real-data sources: layouts per task, state round trip, host slicing, bad records, sources."""

import io
import json
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from mmada_jax import config as config_lib
from mmada_jax.data import pipelines
from mmada_jax.data import sources
from mmada_jax.data import toyworld
from mmada_jax.data import toyworld_tfds
from mmada_jax.tokens import vocab as vocab_lib

N, RES, S = 16, 64, 128
READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def encode(image):
  """A stand-in image tokenizer: 4x4 patches, mean colour quantised to 4 levels per channel (64 codes)."""
  assert image.shape == (RES, RES, 3) and image.dtype == np.uint8
  q = np.clip(image.reshape(4, RES // 4, 4, RES // 4, 3).mean((1, 3)) // 64, 0, 3).astype(int)
  return (q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).reshape(-1)


@pytest.fixture(scope="module")
def setup():
  cfg = vocab_lib.apply_toy_vocab(config_lib.get_base_config(), codebook_size=64, num_image_tokens=N)
  cfg.data.max_text_len = S
  cfg.magvit.resolution = RES
  cfg.data.batch_size_t2i, cfg.data.batch_size_lm, cfg.data.batch_size_mmu = 4, 2, 2
  cfg.data.toyworld.num_train = 64
  config_lib.validate(cfg)
  vocab = vocab_lib.Vocab.from_config(cfg.vocab)
  return cfg, vocab, toyworld.toy_tokenizer(vocab, num_records=200)


def config_with(cfg, **data):
  cfg = cfg.copy_and_resolve_references()
  for key, value in data.items():
    cfg.data[key] = value
  return cfg


def build(cfg, tok, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return pipelines.build_iterator(cfg, tok, encode, read_options=READ, **kw)


def test_toyworld_batch_composition_and_layouts(setup):
  cfg, v, tok = setup
  cfg = config_with(cfg, lm_sources=("toyworld:chat",), mmu_sources=("toyworld:cot",))
  batch = next(build(cfg, tok))
  s, L = S, S + N + 3
  assert sorted(batch) == ["lm", "mmu", "t2i"]
  for task, rows in (("t2i", 4), ("lm", 2), ("mmu", 2)):
    for key in ("input_ids", "labels", "valid_mask", "prompt_mask"):
      assert batch[task][key].shape == (rows, L) and batch[task][key].dtype == np.int32, (task, key)
  t2i = batch["t2i"]["input_ids"]
  assert (t2i[:, s + 1] == v.soi_id).all() and (t2i[:, -1] == v.eoi_id).all()
  assert v.is_image(t2i[:, s + 2:s + 2 + N]).all()
  assert ((t2i[:, s] == v.eos_id) & (t2i[:, :s + 1] == v.t2i_id).any(1)).all()
  mmu = batch["mmu"]
  assert (mmu["input_ids"][:, 0] == v.mmu_id).all() and (mmu["labels"][:, :N + 3] == -100).all()
  text = tok.decode(mmu["input_ids"][0, N + 3:])
  assert "You should first think" in text and "<think>" in text and "<eot_id>" in text
  lm = batch["lm"]
  assert (lm["input_ids"][:, 0] == v.bos_id).all() and (lm["labels"] == lm["input_ids"]).all()
  for row in range(2):  # the prompt mask ends at the assistant header
    last = np.flatnonzero(lm["input_ids"][row] == v.end_header_id)[-1]
    assert lm["prompt_mask"][row, :last + 1].all() and not lm["prompt_mask"][row, last + 1:].any()


def test_state_round_trip_gives_the_next_batch_and_seed_determinism(setup):
  cfg, _, tok = setup
  cfg = config_with(cfg, lm_sources=("toyworld:text", "toyworld:chat"), lm_weights=(0.5, 0.5))
  it = build(cfg, tok)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON (checkpointed with the model)
  want = [next(it) for _ in range(2)]
  again = build(cfg, tok)
  again.set_state(state)
  for w in want:
    got = next(again)
    for task in w:
      for key in w[task]:
        np.testing.assert_array_equal(got[task][key], w[task][key])
  fresh, same = build(cfg, tok), build(cfg, tok)  # same seed -> same batches
  np.testing.assert_array_equal(next(fresh)["t2i"]["input_ids"], next(same)["t2i"]["input_ids"])
  reseeded = config_with(cfg)
  reseeded.seed = 1  # another seed -> another order
  assert not np.array_equal(next(build(reseeded, tok))["t2i"]["input_ids"], next(build(cfg, tok))["t2i"]["input_ids"])
  with pytest.raises(ValueError, match="sources"):
    build(config_with(cfg, lm_sources=("toyworld:text",), lm_weights=(1.0,)), tok).set_state(state)


def write_jsonl(path, rows):
  with open(path, "wb") as fh:
    for row in rows:
      fh.write(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n")
  return str(path)


def lm_only(cfg, spec, rows=2):
  return config_with(cfg, batch_size_t2i=0, batch_size_mmu=0, batch_size_lm=rows, lm_sources=(spec,), lm_weights=(1.0,))


def test_hosts_see_disjoint_records_and_sizes_split(setup, tmp_path):
  cfg, _, tok = setup
  path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"record {i}"} for i in range(40)])
  cfg = lm_only(cfg, f"jsonl:{path}", rows=4)
  seen = []
  for host in range(2):
    it = build(cfg, tok, process_index=host, process_count=2)
    rows = [tok.decode(r, skip_special_tokens=True) for _ in range(10) for r in next(it)["lm"]["input_ids"]]
    assert all(len(r) for r in rows)
    seen.append(rows)
  assert len(seen[0]) == len(seen[1]) == 20  # 4 global rows per step = 2 per host
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == {f"record {i}" for i in range(40)}  # one epoch, each record exactly once
  with pytest.raises(ValueError, match="not divisible"):
    build(lm_only(cfg, f"jsonl:{path}", rows=3), tok, process_index=0, process_count=2)


def png_bytes(array, mode=None, fmt="PNG"):
  buf = io.BytesIO()
  (Image.fromarray(array).convert(mode) if mode else Image.fromarray(array)).save(buf, fmt)
  return buf.getvalue()


def test_bad_records_are_skipped_counted_or_raised(setup, tmp_path):
  cfg, _, tok = setup
  rgb = toyworld.ToyWorld().example("train", 0)["image"]
  (tmp_path / "ok.png").write_bytes(png_bytes(rgb))
  (tmp_path / "gray.png").write_bytes(png_bytes(rgb, "L"))
  (tmp_path / "rgba.png").write_bytes(png_bytes(rgb, "RGBA"))
  (tmp_path / "cmyk.jpg").write_bytes(png_bytes(rgb, "CMYK", "JPEG"))
  Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "deep.png")
  (tmp_path / "trunc.png").write_bytes(png_bytes(rgb)[:200])
  rows = [{"caption": "fine", "image": "ok.png"}, {"caption": "gray", "image": "gray.png"},
          {"caption": "alpha", "image": "rgba.png"}, {"caption": "cmyk", "image": "cmyk.jpg"},
          {"caption": "deep", "image": "deep.png"}, {"caption": "cut", "image": "trunc.png"},
          {"caption": "gone", "image": "missing.png"}, {"caption": "  ", "image": "ok.png"},
          b'{"caption": "\xff\xfe bad", "image": "ok.png"}\n', b"{not json\n", {"image": "ok.png"}]
  path = write_jsonl(tmp_path / "pairs.jsonl", rows)
  base = config_with(cfg, batch_size_lm=0, batch_size_mmu=0, batch_size_t2i=1, t2i_sources=(f"jsonl:{path}",),
                     t2i_weights=(1.0,), shuffle=False)
  it = build(base, tok)
  for _ in range(6):  # the 5 usable records of epoch 1 (in file order), then the first one of epoch 2
    next(it)
  stats = it.statistics()["t2i"][f"0:jsonl:{path}"]
  assert stats["records"] == 6
  assert stats["converted:l"] == 1 and stats["converted:alpha"] == 1 and stats["converted:cmyk"] == 1
  assert stats["converted:16bit"] == 1
  assert stats["skipped/unreadable image"] == 1 and stats["skipped/missing image file"] == 1
  assert stats["skipped/empty text"] == 1 and stats["skipped/non-utf8 text"] == 1
  assert stats["skipped/invalid json"] == 1 and stats["skipped/missing text"] == 1
  strict = build(config_with(base, strict=True), tok)
  for _ in range(5):
    next(strict)
  with pytest.raises(sources.BadRecordError, match=r"pairs.jsonl:6: unreadable image"):
    next(strict)


def test_empty_and_all_bad_sources_are_clear_errors(setup, tmp_path):
  cfg, _, tok = setup
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(sources.EmptyDataError, match="has no records"):
    build(lm_only(cfg, f"jsonl:{empty}"), tok)
  with pytest.raises(sources.EmptyDataError, match="no file matches"):
    build(lm_only(cfg, f"jsonl:{tmp_path}/nothing*.jsonl"), tok)
  bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": ""}] * 5)
  with pytest.raises(sources.EmptyDataError, match="all bad"):
    next(build(lm_only(cfg, f"jsonl:{bad}"), tok))


def test_real_data_sources(setup, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  cfg, v, tok = setup
  image = toyworld.ToyWorld().example("train", 1)["image"]
  pq.write_table(pa.table({"content": ["one two three\nfour", "five six"]}), tmp_path / "web.parquet",
                 row_group_size=1)
  gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}])
  assert sources.gsm8k_parts("a\n#### 1,234", "x") == ("a", "1234")
  (tmp_path / "folder").mkdir()
  (tmp_path / "folder" / "a.png").write_bytes(png_bytes(image))
  (tmp_path / "folder" / "a.txt").write_text("a caption from a file")
  with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
    for name, data in (("k1.png", png_bytes(image)), ("k1.txt", b"a tar caption"), ("k2.jpg", png_bytes(image,
                       fmt="JPEG")), ("k2.json", json.dumps({"caption": "json caption"}).encode())):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  (tmp_path / "llava.json").write_text(json.dumps([{"id": "s1", "image": "folder/a.png", "conversations": [
      {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Shapes."}]}]))
  cases = [("lm", f"parquet:{tmp_path}/web.parquet", "one two threefour"),
           ("lm", f"gsm8k:{gsm}", "<think>2+3=5</think>5"),
           ("t2i", f"images:{tmp_path}/folder", "a caption from a file"),
           ("t2i", f"wds:{tmp_path}/shard-*.tar", "caption"),
           ("mmu", f"llava:{tmp_path}/llava.json", "What is shown?<|eot_id|>"),
           ("mmu", f"wds:{tmp_path}/shard-*.tar", "Please describe this image in detail.<eot_id>")]
  for task, spec, expect in cases:
    sizes = {f"batch_size_{t}": (1 if t == task else 0) for t in pipelines.TASKS}
    c = config_with(cfg, **sizes, **{f"{task}_sources": (spec,), f"{task}_weights": (1.0,)}, shuffle=False,
                    cond_dropout_prob=0.0)
    batch = next(build(c, tok))[task]
    assert expect in tok.decode(batch["input_ids"][0]), (spec, tok.decode(batch["input_ids"][0]))
  assert len(sources.WebDatasetSource(f"{tmp_path}/shard-*.tar")) == 2
  assert len(sources.ParquetSource(f"{tmp_path}/web.parquet")) == 2


def test_tfds_arrayrecord_toyworld_and_class_name_captions(setup, tmp_path):
  import tensorflow_datasets as tfds

  cfg, v, tok = setup
  c = config_with(cfg, data_dir=str(tmp_path))
  c.data.toyworld.num_train, c.data.toyworld.num_validation, c.data.toyworld.num_test = 8, 2, 3
  builder = toyworld_tfds.builder(c)
  builder.download_and_prepare()
  assert {k: s.num_examples for k, s in builder.info.splits.items()} == {"train": 8, "validation": 2, "test": 3}
  spec = toyworld_tfds.source_spec(c)
  src = tfds.data_source(spec[len("tfds:"):], split="test", data_dir=str(tmp_path))
  world = toyworld.ToyWorld.from_config(c)
  for record in src:  # the stored test split is the generator's fixed held-out set
    index = int(record["id"].decode().rsplit("/", 1)[1])
    np.testing.assert_array_equal(record["image"], world.example("test", index)["image"])
  batch = next(build(config_with(c, t2i_sources=(spec,), mmu_sources=(spec + ":validation",), lm_sources=(spec,)),
                     tok))
  assert v.is_image(batch["t2i"]["input_ids"][:, S + 2:S + 2 + N]).all()

  class TinyClasses(tfds.core.GeneratorBasedBuilder):
    """ImageNet-like: image + class label; the caption is the class name (official stage 1.1 convention)."""
    VERSION = tfds.core.Version("1.0.0")
    code_path = toyworld_tfds.ToyWorld.code_path

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=(RES, RES, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(names=["golden_retriever", "tench"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(2):
        yield i, {"image": toyworld.ToyWorld().example("train", i)["image"], "label": i}

  TinyClasses(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  c2 = config_with(c, batch_size_lm=0, batch_size_mmu=0, batch_size_t2i=2, t2i_sources=("tfds:tiny_classes",),
                   shuffle=False)
  texts = {tok.decode(r, skip_special_tokens=True) for r in next(build(c2, tok))["t2i"]["input_ids"][:, :S + 1]}
  assert texts <= {"golden retriever", "tench", ""}  # "" = condition dropout
  (tmp_path / "labels.txt").write_text("0: golden retriever dog\n1: tench, Tinca tinca\n")
  c3 = config_with(c2, t2i_sources=(f"tfds:tiny_classes:train:{tmp_path}/labels.txt",), cond_dropout_prob=0.0)
  texts = {tok.decode(r, skip_special_tokens=True) for r in next(build(c3, tok))["t2i"]["input_ids"][:, :S + 1]}
  assert texts == {"golden retriever dog", "tench, Tinca tinca"}
  (tmp_path / "bad_labels.txt").write_text("0: only one\n")
  with pytest.raises(ValueError, match=r"no description for class indices \[1\]"):
    build(config_with(c2, t2i_sources=(f"tfds:tiny_classes:train:{tmp_path}/bad_labels.txt",)), tok)


def test_data_config_validation(setup):
  cfg, _, tok = setup
  bad = config_with(cfg, t2i_weights=(1.0, 2.0), lm_sources=("ftp:x",), cond_dropout_prob=2.0)
  bad.data.toyworld.image_size = 40
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(bad)
  for key in ("data.t2i_weights", "data.lm_sources", "data.cond_dropout_prob", "data.toyworld.image_size"):
    assert key in str(err.value)
  other = toyworld.toy_tokenizer(vocab_lib.Vocab.from_config(dict(vocab_lib.toy_vocab_values(num_plain_tokens=400),
                                                                  num_image_tokens=N)), num_records=50)
  with pytest.raises(ValueError, match="another vocabulary"):
    build(cfg, other)


def test_mmu_answers_cut_off_by_the_text_length_are_skipped_or_counted(setup):
  """With S too short for the CoT instruction, every CoT visual question loses its whole answer: such records are
  skipped (strict mode: an error naming data.max_text_len) and a source of nothing else fails instead of training on
  prompt continuations; answers cut only in part are kept and counted."""
  cfg, v, tok = setup
  short = config_with(cfg, batch_size_t2i=0, batch_size_lm=0, mmu_sources=("toyworld:cot",), mmu_weights=(1.0,))
  short.data.max_text_len = 48
  with pytest.raises(sources.EmptyDataError, match="answer cut off"):
    next(build(short, tok))
  with pytest.raises(sources.BadRecordError, match=r"answer cut off.*raise data.max_text_len"):
    next(build(config_with(short, strict=True), tok))
  plain = config_with(short, mmu_sources=("toyworld:qa",))  # short answers: a few long captions lose their end
  plain.data.max_text_len = 40
  it = build(plain, tok)
  for _ in range(16):
    next(it)
  stats = it.statistics()["mmu"]["0:toyworld:qa"]
  assert stats["answer_truncated"] > 0 and stats["records"] == 32


def test_lm_rows_of_their_own_length(setup):
  """`data.lm_seq_len`: lm rows of that length (t2i / mmu keep L); a chat longer than it is skipped as too long
  (strict: named), and the setting is validated."""
  cfg, v, tok = setup
  chat = config_with(cfg, lm_sources=("toyworld:chat",), lm_seq_len=120)
  batch = next(build(chat, tok))
  assert batch["lm"]["input_ids"].shape == (2, 120) and batch["t2i"]["input_ids"].shape == (4, S + N + 3)
  for row in range(2):
    ids = batch["lm"]["input_ids"][row]
    assert ids[0] == v.bos_id and ids[-1] == v.eos_id and v.eot_id in ids.tolist()
    last = np.flatnonzero(ids == v.end_header_id)[-1]
    assert batch["lm"]["prompt_mask"][row, :last + 1].all() and not batch["lm"]["prompt_mask"][row, last + 1:].any()
  with pytest.raises(sources.BadRecordError, match=r"too long.*lm rows of 40"):
    next(build(config_with(chat, lm_seq_len=40, strict=True), tok))
  with pytest.raises(config_lib.ConfigError, match="data.lm_seq_len"):
    config_lib.validate(config_with(cfg, lm_seq_len=1))
  assert config_lib.row_lengths(chat) == {"t2i": S + N + 3, "lm": 120, "mmu": S + N + 3}
  assert config_lib.row_lengths(cfg)["lm"] == S + N + 3
