"""`mmada-jax prepare`: resumable ArrayRecord shards of token ids, bad records in the manifest, `tokens:DIR` batches
equal to online encoding, refusal to mix tokenizers or sources, the command line."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest
from PIL import Image

from mmada_jax import cli, config as config_lib
from mmada_jax.data import pipelines, prepare, prepared, sources, toyworld
from mmada_jax.data.tokenizer import make_tokenizer
from mmada_jax.inference.image_tokenizer import online_encoder
from mmada_jax.models import magvit
from mmada_jax.train import magvit as magvit_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "toyworld.py") + ":cot"
# A narrow MAGVIT-v2 (8 x 8 = 64 codes of 10 bits per 64 px image) and 24 ToyWorld records: each run takes seconds.
OVERRIDES = {"magvit.resolution": "64", "magvit.channels": "8", "magvit.norm_groups": "8",
             "magvit.encoder_channel_mult": "1,2,2,2", "magvit.encoder_num_res_blocks": "1,1,1,1",
             "magvit.decoder_channel_mult": "1,2,2,2", "magvit.decoder_num_res_blocks": "1,1,1,1",
             "vocab.num_image_tokens": "64", "data.toyworld.num_train": "24", "data.read_threads": "1",
             "data.batch_size_t2i": "4", "data.batch_size_lm": "0", "data.batch_size_mmu": "4"}
READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def load_config(**extra):
  return config_lib.load_config(CONFIG, dict(OVERRIDES, **extra))


def config_args(**extra) -> list[str]:
  return ["--config", CONFIG] + [f"--config.{k}={v}" for k, v in dict(OVERRIDES, **extra).items()]


def png_bytes(array, mode=None):
  buf = io.BytesIO()
  (Image.fromarray(array).convert(mode) if mode else Image.fromarray(array)).save(buf, "PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Two MAGVIT checkpoints (seeds 0 and 1), the text tokenizer, an image folder with a corrupt file and an empty
  caption, and one uninterrupted reference run."""
  root = tmp_path_factory.mktemp("prepare")
  config = load_config()
  cfg = magvit.MagvitConfig.from_config(config.magvit)
  paths = {}
  for seed in (0, 1):
    paths[f"magvit{seed}"] = str(root / f"magvit{seed}")
    magvit_train.save_trained_params(paths[f"magvit{seed}"], magvit.init_params(cfg, seed), cfg, 0)
  folder = root / "folder"
  folder.mkdir()
  world = toyworld.ToyWorld.from_config(config)
  for i in range(6):
    rec = world.example("train", i)
    (folder / f"img{i}.png").write_bytes(png_bytes(rec["image"], "L" if i == 4 else None))
    (folder / f"img{i}.txt").write_text(rec["draw_prompt"] if i != 3 else "   ")
  (folder / "img2.png").write_bytes(png_bytes(world.example("train", 2)["image"])[:150])  # truncated: corrupt
  tokenizer = make_tokenizer(config)
  env = dict(root=root, config=config, tokenizer=tokenizer, folder=str(folder), **paths)
  env["ref"] = str(root / "ref")
  env["ref_manifest"] = run(env, "toyworld:draw", "t2i", env["ref"])
  return env


def run(env, spec, task, out, magvit_key="magvit0", **kw):
  kw.setdefault("shard_size", 5)
  kw.setdefault("batch_size", 4)
  return prepare.prepare(env["config"], spec, task, out, magvit=env[magvit_key], tokenizer=env["tokenizer"],
                         progress=False, log=lambda m: None, **kw)


def files_of(path) -> dict[str, bytes]:
  return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path)) if n != ".lock"}


def test_reference_run_layout_and_records(env):
  m = env["ref_manifest"]
  assert m["complete"] and m["num_shards"] == 5 and m["records"] == 24 and not m["skipped"]
  assert [s["records"] for s in m["shards"]] == [5, 5, 5, 5, 4]
  assert sorted(files_of(env["ref"])) == ["manifest.json"] + [f"tokens-{k:05d}-of-00005.array_record" for k in range(5)]
  ident = m["identity"]
  assert ident["image_tokenizer"]["param_sha256"] == prepared.checkpoint_sha256(env["magvit0"])
  assert ident["image_tokenizer"]["codebook_size"] == 1024 and ident["source"]["toyworld"]["num_train"] == 24
  src = sources.TokenShardSource(env["ref"])
  rec = src[7]
  world = toyworld.ToyWorld.from_config(env["config"])
  assert rec["id"] == "toyworld/train/7" and rec["index"] == 7
  assert rec["text"] == world.example("train", 7)["draw_prompt"]
  assert rec["text_ids"].dtype == np.int32 and rec["text_ids"].tolist() == env["tokenizer"].encode(rec["text"])
  assert rec["image_codes"].shape == (64,) and rec["image_codes"].dtype == np.uint16


def test_interrupted_then_rerun_gives_the_same_bytes(env, tmp_path):
  out = str(tmp_path / "out")

  def stop(k):
    if k == 1:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    run(env, "toyworld:draw", "t2i", out, after_shard=stop)
  half = json.load(open(os.path.join(out, "manifest.json")))
  assert not half["complete"] and [s["shard"] for s in half["shards"]] == [0, 1]
  with pytest.raises(sources.PreparedDataError, match="did not finish"):
    sources.TokenShardSource(out)
  tmp = os.path.join(out, "tokens-00002-of-00005.array_record.tmp")
  with open(tmp, "wb") as fh:  # what a run killed while writing shard 2 leaves behind
    fh.write(b"half a shard")
  before = files_of(out)
  run(env, "toyworld:draw", "t2i", out)
  after = files_of(out)
  assert all(after[n] == before[n] for n in before if n.startswith("tokens-") and n.endswith(".array_record"))
  assert after == files_of(env["ref"])  # shards and manifest byte for byte


KILL_SCRIPT = """
import sys, time
from mmada_jax import cli
from mmada_jax.data import prepare
write = prepare._write_shard
def slow(*args, **kwargs):
  out = write(*args, **kwargs)
  time.sleep(0.4)  # give the test time to kill the process between and inside shards
  return out
prepare._write_shard = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigkill_mid_run_then_rerun_gives_the_same_bytes(env, tmp_path):
  out = tmp_path / "killed"
  args = ["prepare", "--source", "toyworld:draw", "--task", "t2i", "--out", str(out), "--shard_size", "5",
          "--batch_size", "4", "--magvit", env["magvit0"], "--no_progress"] + config_args()
  proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT] + args, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if out.is_dir() and len([n for n in os.listdir(out) if n.endswith(".array_record")]) >= 2:
      break
    time.sleep(0.02)
  assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
  time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  published = [n for n in os.listdir(out) if n.endswith(".array_record")]
  assert 2 <= len(published) < 5
  ref = files_of(env["ref"])
  assert all(files_of(out)[n] == ref[n] for n in published)  # no half shard under a final name
  run(env, "toyworld:draw", "t2i", str(out))
  assert files_of(out) == ref


def test_corrupt_image_and_empty_caption_are_skipped_and_named(env, tmp_path):
  out = str(tmp_path / "folder")
  m = run(env, f"images:{env['folder']}", "t2i", out, shard_size=4)
  assert m["records"] == 4 and [s["records"] for s in m["shards"]] == [2, 2]
  skipped = {os.path.basename(s["id"]): s["reason"] for s in m["skipped"]}
  assert skipped == {"img2.png": "unreadable image", "img3.png": "empty text"}
  assert m["skipped_by_reason"] == {"empty text": 1, "unreadable image": 1} and m["converted"] == {"converted:l": 1}
  assert [s["index"] for s in m["skipped"]] == [2, 3] and "img2.png" in m["skipped"][0]["detail"]
  src = sources.TokenShardSource(out)
  assert [os.path.basename(src[i]["id"]) for i in range(len(src))] == ["img0.png", "img1.png", "img4.png", "img5.png"]


def build(config, tokenizer, encoder=None):
  return pipelines.build_iterator(config, tokenizer, encoder, read_options=READ, process_index=0, process_count=1)


def test_tokens_source_gives_the_online_batches(env, tmp_path):
  tok = env["tokenizer"]
  mmu_dir = str(tmp_path / "mmu")
  run(env, "toyworld:cot", "mmu", mmu_dir, shard_size=7)
  online_cfg = load_config(**{"data.image_tokenizer": env["magvit0"], "data.t2i_sources": "toyworld:draw"})
  online = build(online_cfg, tok, online_encoder(online_cfg))
  tokens_cfg = load_config(**{"data.image_tokenizer": env["magvit0"], "data.t2i_sources": f"tokens:{env['ref']}",
                              "data.mmu_sources": f"tokens:{mmu_dir}"})  # validated: `tokens` is a known kind
  prepared = build(tokens_cfg, tok)  # no image encoder
  for _ in range(8):  # more than one epoch of 24 records
    want, got = next(online), next(prepared)
    for task in ("t2i", "mmu"):
      for key in want[task]:
        np.testing.assert_array_equal(got[task][key], want[task][key], err_msg=f"{task}/{key}")
  assert prepared.statistics()["t2i"][f"0:tokens:{env['ref']}"]["records"] == 32
  without = tokens_cfg.copy_and_resolve_references()
  without.data.image_tokenizer = ""  # no checkpoint named: architecture, vocab and text tokenizer are still checked
  next(build(without, tok))


def test_refuses_other_tokenizer_source_or_task(env, tmp_path):
  before = files_of(env["ref"])
  with pytest.raises(sources.PreparedDataError, match=r"image_tokenizer\.param_sha256"):
    run(env, "toyworld:draw", "t2i", env["ref"], magvit_key="magvit1")
  with pytest.raises(sources.PreparedDataError, match=r"source\.spec: 'toyworld:draw' vs 'images:"):
    run(env, f"images:{env['folder']}", "t2i", env["ref"])
  with pytest.raises(sources.PreparedDataError, match=r"shard_size: 5 vs 6"):
    run(env, "toyworld:draw", "t2i", env["ref"], shard_size=6)
  assert files_of(env["ref"]) == before  # nothing touched
  cfg = load_config(**{"data.image_tokenizer": env["magvit1"], "data.t2i_sources": f"tokens:{env['ref']}"})
  with pytest.raises(sources.PreparedDataError, match=r"(?s)data.t2i_sources .*param_sha256"):
    build(cfg, env["tokenizer"])
  cfg.data.image_tokenizer, cfg.data.mmu_sources = "", (f"tokens:{env['ref']}",)
  with pytest.raises(sources.PreparedDataError, match=r"(?s)data.mmu_sources .*task: 't2i' vs 'mmu'"):
    build(cfg, env["tokenizer"])
  stray = tmp_path / "stray"
  stray.mkdir()
  (stray / "tokens-00000-of-00001.array_record").write_bytes(b"")
  with pytest.raises(sources.PreparedDataError, match="no manifest.json"):
    run(env, "toyworld:draw", "t2i", str(stray))


def test_command_line_end_to_end(env, tmp_path, capsys):
  out = str(tmp_path / "cli")
  args = ["prepare", "--source", f"images:{env['folder']}", "--task", "mmu", "--out", out, "--shard_size", "3",
          "--batch_size", "2", "--magvit", env["magvit0"], "--no_progress"] + config_args()
  assert cli.main(args) == 0
  captured = capsys.readouterr()
  assert "prepared 4 records in 2 shards, 2 skipped (empty text: 1, unreadable image: 1)" in captured.out
  assert f"--config.data.mmu_sources=tokens:{out}" in captured.out
  first = files_of(out)
  assert cli.main(args) == 0 and "2 shards already done" in capsys.readouterr().err
  assert files_of(out) == first
  rec = sources.TokenShardSource(out)[0]
  assert "Please describe this image in detail.<eot_id>" in rec["text"]  # data.mmu_literal_eot (official)
  bad = [a if a != env["magvit0"] else env["magvit1"] for a in args]
  assert cli.main(bad) == 1
  assert "image_tokenizer.param_sha256" in capsys.readouterr().err
  assert cli.main(args[:-len(config_args())] + config_args(**{"data.mmu_literal_eot": "false"})) == 1
  assert "layout.mmu_literal_eot: True vs False" in capsys.readouterr().err
