"""Data faults injected into real sources: truncated shards (webdataset tar, JSON lines, Parquet), corrupt image bytes,
malformed records, and sources that run dry while a run reads them. Bad records are skipped and counted (strict mode:
raise with the record's identity); a source with nothing usable left is an error that says so, never a hang."""

import io
import os
import tarfile
import threading

import pytest

from mmada_jax.data import sources, toyworld
from test_pipelines import build, config_with, lm_only, png_bytes, setup, write_jsonl  # noqa: F401 (setup: fixture)


def write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


def t2i_only(cfg, spec, **extra):
  return config_with(cfg, batch_size_t2i=1, batch_size_lm=0, batch_size_mmu=0, t2i_sources=(spec,),
                     t2i_weights=(1.0,), shuffle=False, cond_dropout_prob=0.0, **extra)


def stats(it, task="t2i"):
  (counts,) = it.statistics()[task].values()
  return counts


def within(seconds, fn):
  """fn() run in a thread: its result or exception; fails the test if it has not returned after `seconds` (a hang)."""
  out = {}

  def target():
    try:
      out["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      out["error"] = e

  t = threading.Thread(target=target, daemon=True)
  t.start()
  t.join(seconds)
  assert not t.is_alive(), f"still waiting after {seconds} s: the data source hangs instead of failing"
  if "error" in out:
    raise out["error"]
  return out["value"]


@pytest.fixture
def image():
  return toyworld.ToyWorld().example("train", 2)["image"]


def test_corrupt_images_and_malformed_wds_records_are_skipped_or_raised(setup, tmp_path, image):
  cfg, _, tok = setup
  good = png_bytes(image)
  path = write_tar(tmp_path / "shard-0.tar", [
      ("a.png", good), ("a.txt", b"fine one"),
      ("b.png", b"\x89PNG\r\n\x1a\n" + os.urandom(300)), ("b.txt", b"garbage pixels"),  # corrupt image bytes
      ("c.jpg", good[:len(good) // 3]), ("c.txt", b"cut image"),  # truncated image
      ("d.png", good), ("d.json", b"{\"caption\": "),  # malformed JSON record
      ("e.png", good), ("e.txt", b"\xff\xfe not utf-8"),  # undecodable caption
      ("f.png", good), ("f.txt", b"fine two")])
  it = build(t2i_only(cfg, f"wds:{path}"), tok)
  for _ in range(3):  # a, f, then a again (epoch 2)
    next(it)
  counts = stats(it)
  assert counts["records"] == 3
  assert counts["skipped/unreadable image"] == 2 and counts["skipped/invalid json"] == 1
  assert counts["skipped/non-utf8 text"] == 1
  strict = build(t2i_only(cfg, f"wds:{path}", strict=True), tok)
  next(strict)
  with pytest.raises(sources.BadRecordError, match=r"shard-0.tar:b: unreadable image"):
    next(strict)


def test_truncated_jsonl_shard_drops_the_cut_record(setup, tmp_path):
  cfg, _, tok = setup
  path = write_jsonl(tmp_path / "part-0.jsonl", [{"text": f"line number {i}"} for i in range(4)])
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:-9])  # the last record is cut mid-object, as by a failed copy
  it = build(lm_only(cfg, f"jsonl:{path}", rows=1), tok)
  for _ in range(4):
    next(it)
  counts = stats(it, "lm")
  assert counts["records"] == 4 and counts["skipped/invalid json"] == 1
  with pytest.raises(sources.BadRecordError, match=r"part-0.jsonl:4: invalid json"):
    strict = build(config_with(lm_only(cfg, f"jsonl:{path}", rows=1), strict=True), tok)
    for _ in range(4):
      next(strict)


def test_truncated_tar_shard_keeps_the_other_shards(setup, tmp_path, image):
  cfg, _, tok = setup
  good = png_bytes(image)
  write_tar(tmp_path / "shard-0.tar", [("a.png", good), ("a.txt", b"first shard")])
  cut = write_tar(tmp_path / "shard-1.tar", [("b.png", good), ("b.txt", b"second shard"), ("c.png", good),
                                             ("c.txt", b"lost")])
  with tarfile.open(cut) as tar:
    member = tar.getmember("c.png")
  data = open(cut, "rb").read()
  with open(cut, "wb") as f:
    f.write(data[:member.offset_data + member.size // 2])  # cut inside the last image, as by a failed upload
  with pytest.warns(UserWarning, match=r"shard-1.tar: truncated or unreadable tar shard .*'c.png' is cut short"):
    it = build(t2i_only(cfg, f"wds:{tmp_path}/shard-*.tar"), tok)
  next(it)
  assert stats(it)["records"] == 1
  with pytest.warns(UserWarning):
    source = sources.WebDatasetSource(f"{tmp_path}/shard-*.tar")
  assert [key for _, key, _ in source.items] == ["a", "b"]  # b, read before the cut, is kept; c is not
  assert [p for p, _ in source.skipped_files] == [str(cut)]
  with pytest.raises(sources.BadRecordError, match=r"shard-1.tar: truncated or unreadable tar shard"):
    build(t2i_only(config_with(cfg, strict=True), f"wds:{tmp_path}/shard-*.tar"), tok)


def test_truncated_parquet_file_keeps_the_other_files(setup, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  cfg, _, tok = setup
  for i in range(2):
    pq.write_table(pa.table({"text": [f"file {i} row {j}" for j in range(3)]}), tmp_path / f"p{i}.parquet")
  data = open(tmp_path / "p1.parquet", "rb").read()
  (tmp_path / "p1.parquet").write_bytes(data[:len(data) // 2])
  with pytest.warns(UserWarning, match=r"p1.parquet: unreadable parquet file"):
    it = build(lm_only(cfg, f"parquet:{tmp_path}/p*.parquet", rows=1), tok)
  next(it)
  assert stats(it, "lm")["records"] == 1
  with pytest.warns(UserWarning):
    assert len(sources.ParquetSource(f"{tmp_path}/p*.parquet")) == 3  # the intact file's rows
  with pytest.raises(sources.BadRecordError, match=r"p1.parquet: unreadable parquet file"):
    build(lm_only(config_with(cfg, strict=True), f"parquet:{tmp_path}/p*.parquet", rows=1), tok)
  with pytest.warns(UserWarning), pytest.raises(sources.EmptyDataError, match=r"no usable record .*p1.parquet"):
    sources.ParquetSource(f"{tmp_path}/p1.parquet")


def test_source_emptied_during_the_run_is_an_error_not_a_hang(setup, tmp_path):
  cfg, _, tok = setup
  path = write_jsonl(tmp_path / "live.jsonl", [{"text": f"record {i} " * 3} for i in range(6)])
  it = build(lm_only(cfg, f"jsonl:{path}", rows=1), tok)
  next(it)
  open(path, "wb").close()  # the file is emptied under the running pipeline (e.g. a shard rewritten in place)
  with pytest.raises(sources.EmptyDataError, match=r"lm/jsonl:.*consecutive records were all bad"):
    within(60, lambda: [next(it) for _ in range(20)])


def test_source_deleted_during_the_run_names_the_file(setup, tmp_path):
  cfg, _, tok = setup
  path = write_jsonl(tmp_path / "gone.jsonl", [{"text": f"record {i} " * 3} for i in range(6)])
  it = build(lm_only(cfg, f"jsonl:{path}", rows=1), tok)
  next(it)
  os.remove(path)
  # a ValueError naming the file and record (one line from the CLI), neither a bare OSError nor the hang guard
  with pytest.raises(sources.BadRecordError, match=r"gone.jsonl:\d+: unreadable file \(FileNotFoundError"):
    within(60, lambda: [next(it) for _ in range(20)])


def test_all_records_bad_in_training_mixture_is_a_clear_error(setup, tmp_path):
  """A mixture where one source has nothing usable: the error names that source, within bounded time."""
  cfg, _, tok = setup
  good = write_jsonl(tmp_path / "good.jsonl", [{"text": "usable text"}] * 4)
  bad = write_jsonl(tmp_path / "bad.jsonl", [b"{broken\n"] * 4)
  c = config_with(cfg, batch_size_t2i=0, batch_size_mmu=0, batch_size_lm=1,
                  lm_sources=(f"jsonl:{good}", f"jsonl:{bad}"), lm_weights=(1.0, 1.0))
  it = build(c, tok)
  with pytest.raises(sources.EmptyDataError, match=r"source lm/jsonl:.*bad.jsonl: 5 consecutive records were all bad"):
    within(60, lambda: [next(it) for _ in range(20)])
