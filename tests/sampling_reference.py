"""Test helpers for the samplers: fixture discovery, backbone loading, and independent float64 NumPy samplers written
from the pseudocode of docs/parity.md §7-§8 (full-sequence logits, float64 softmax), which also write
synthetic sampling fixture sets in the official file format."""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil

import numpy as np
import pytest

import reference
from mmada_jax import checkpoint as ckpt
from mmada_jax.convert import official
from mmada_jax.convert import safetensors_io as st
from mmada_jax.models import llada

# ---- fixture discovery ---------------------------------------------------------------------------------------------


def sampler_sets(directory: pathlib.Path, kind: str) -> list[tuple[str, str]]:
  """(file stem, setting) of every `<kind>_<C>*.npz` in `directory`; settings are the `<setting>__` key prefixes."""
  out = []
  for path in sorted(directory.glob(f"{kind}_*.npz")):
    with np.load(path) as f:
      names = sorted({k.split("__")[0] for k in f.files if "__" in k})
    out += [(path.stem, name) for name in names]
  return out


def backbone_stem(stem: str, kind: str) -> str:
  """`text_generate_A` / `text_generate_A_long` -> `backbone_A` (the set letter is the token after the kind)."""
  return "backbone_" + stem[len(kind) + 1:].split("_")[0]


def index_entry(directory: pathlib.Path, kind: str, npz_name: str) -> dict:
  """The `kind` entry of an index JSON in `directory` whose `file` is `npz_name` ({} if there is none)."""
  for path in sorted(directory.glob("*.json")):
    try:
      data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
      continue
    entry = data.get(kind) if isinstance(data, dict) else None
    if isinstance(entry, dict) and entry.get("file") == npz_name:
      return entry
  return {}


def _number(pattern: str, name: str, default: float) -> float:
  m = re.search(pattern, name)
  return float(m.group(1).rstrip(".")) if m else default


def text_params(directory: pathlib.Path, stem: str, setting: str, f, config: dict) -> dict:
  """Sampler parameters of one text setting: from the index JSON, else from the setting name and array shapes."""
  entry = index_entry(directory, "text_generate", f"{stem}.npz").get("settings", {}).get(setting)
  if entry:
    p = dict(entry["params"])
    p["pass_mask"] = p.pop("attention_mask") is not None
    p["n_model_calls"] = entry.get("n_model_calls", p["steps"])
    return p
  prompt, output = f[f"{setting}__prompt"], f[f"{setting}__output"]
  gen = output.shape[1] - prompt.shape[1]
  steps = f[f"{setting}__trace_x"].shape[0]
  return {"steps": steps, "gen_length": gen, "block_length": int(_number(r"block(\d+)", setting, gen)),
          "temperature": 0.0, "cfg_scale": _number(r"cfg(\d+(?:\.\d+)?)", setting, 0.0), "remasking": "low_confidence",
          "mask_id": config["mask_token_id"], "pass_mask": bool((f[f"{setting}__prompt_attention_mask"] == 0).any()),
          "n_model_calls": steps}


def t2i_params(directory: pathlib.Path, stem: str, run: str, f, config: dict) -> dict:
  """Sampler parameters of one t2i run: from the index JSON, else from the run name and array shapes."""
  entry = index_entry(directory, "t2i_generate", f"{stem}.npz").get("runs", {}).get(run)
  if entry:
    return {"timesteps": entry["timesteps"], "guidance_scale": entry["guidance_scale"],
            "temperature": entry["temperature"], "noise_schedule": entry.get("noise_schedule", "cosine"),
            "seq_len": entry["seq_len"], "codebook_size": entry["codebook_size"],
            "image_offset": entry["text_vocab_len"], "mask_id": entry["mask_token_id"],
            "prefix_len": entry["resolution_arg"] + 1}
  steps, _, n = f[f"{run}__gumbel_mask"].shape
  final, codes = f[f"{run}__final_input_ids"], f[f"{run}__output"]
  image = final[:, -(n + 1):-1]
  known = image != config["mask_token_id"]
  offset = int((image - codes)[known][0])
  temp0 = f[f"{run}__temperature"][0] / (1 - 1 / steps)
  return {"timesteps": steps, "guidance_scale": _number(r"(?<!no)cfg(\d+(?:\.\d+)?)", run, 0.0),
          "temperature": _number(r"temp(\d+(?:\.\d+)?)", run, temp0), "noise_schedule": "cosine", "seq_len": n,
          "codebook_size": f[f"{run}__gumbel_sample"].shape[-1], "image_offset": offset,
          "mask_id": config["mask_token_id"], "prefix_len": final.shape[1] - n - 2}


def load_backbone(directory: pathlib.Path, stem: str, tmp: pathlib.Path, layout: str = "stacked"):
  """Converts `<stem>.safetensors` + `<stem>_config.json` with the official importer -> (model, params, config).

  `layout` "unstacked" compiles about a third faster on CPU (used by the tests that are not about parity).
  """
  src = tmp / "official"
  src.mkdir(parents=True)
  shutil.copyfile(directory / f"{stem}.safetensors", src / "model.safetensors")
  shutil.copyfile(directory / f"{stem}_config.json", src / "config.json")
  official.import_official(str(src), str(tmp / "converted"), layout=layout, log=lambda s: None)
  params, meta = ckpt.load_params(str(tmp / "converted"), as_numpy=True)
  m = official.model_config_for(official.Shape(**meta["model"]))
  m.scan_layers = layout == "stacked"
  return llada.build_model(m), params, json.loads((src / "config.json").read_text())


def official_state_dict(directory: pathlib.Path, stem: str) -> tuple[dict, dict]:
  f = st.SafetensorsFile(str(directory / f"{stem}.safetensors"))
  return {k: f.get(k) for k in f.tensors}, json.loads((directory / f"{stem}_config.json").read_text())


# ---- float64 reference samplers ------------------------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _pair(mask: np.ndarray | None) -> np.ndarray | None:
  if mask is None:
    return None
  m = np.asarray(mask).astype(bool)
  return m[:, :, None] & m[:, None, :]


def text_generate(sd, cfg, prompt, *, steps, gen_length, block_length, cfg_scale, mask_id, prompt_mask=None):
  """docs/parity.md §7 at temperature 0 with low-confidence remasking.

  Returns (output, trace [calls, B, L], margins)."""
  b, p = prompt.shape
  x = np.concatenate([prompt, np.full((b, gen_length), mask_id)], 1).astype(np.int64)
  prompt_index = x != mask_id
  pair = None if prompt_mask is None else _pair(np.concatenate([prompt_mask, np.ones((b, gen_length))], 1))
  spb = steps // (gen_length // block_length)
  trace, logit_gaps, conf_gaps = [], [], []
  for blk in range(gen_length // block_length):
    hi = p + (blk + 1) * block_length
    n = (x[:, hi - block_length:hi] == mask_id).sum(1)
    counts = n[:, None] // spb + (np.arange(spb)[None] < (n % spb)[:, None])
    for i in range(spb):
      trace.append(x.copy())
      mask_index = x == mask_id
      if cfg_scale > 0:
        un = np.where(prompt_index, mask_id, x)
        both, _ = reference.forward(sd, cfg, np.concatenate([x, un]), None)
        logits = both[b:] + (cfg_scale + 1) * (both[:b] - both[b:])
      else:
        logits, _ = reference.forward(sd, cfg, x, pair)
      x0 = logits.argmax(-1)
      conf = np.take_along_axis(_softmax(logits), x0[..., None], -1)[..., 0]
      conf[:, hi:] = -np.inf
      x0, conf = np.where(mask_index, x0, x), np.where(mask_index, conf, -np.inf)
      top2 = np.sort(logits, -1)[..., -2:]
      for j in range(b):
        order = np.argsort(-conf[j], kind="stable")
        sel = order[:counts[j, i]]
        x[j, sel] = x0[j, sel]
        logit_gaps += list(top2[j, sel, 1] - top2[j, sel, 0])
        if len(order) > counts[j, i] and np.isfinite(conf[j, order[counts[j, i]]]):
          conf_gaps.append(conf[j, sel[-1]] - conf[j, order[counts[j, i]]])
  margins = {"min_top1_top2_logit_gap_at_transferred": float(min(logit_gaps)),
             "min_confidence_gap_at_topk_cut": float(min(conf_gaps, default=np.inf))}
  return x, np.stack(trace), margins


def _mask_len(n: int, step: int, steps: int) -> int:
  ratio = np.float32((step + 1) / steps)
  mask_ratio = np.cos(ratio * np.float32(np.pi) / np.float32(2))  # float32 throughout, as torch
  return max(math.floor(np.float32(n) * np.float32(mask_ratio)), -(2 ** 31))


def t2i_generate(sd, cfg, ids, mask, un_ids, un_mask, *, guidance, temperature, timesteps, n, codebook, offset,
                 mask_id, prefix_len, gumbel_sample, gumbel_mask):
  """docs/parity.md §8 with injected Gumbel noise. Returns a dict of every stored array and the decision margins."""
  ids = ids.astype(np.int64).copy()
  b = ids.shape[0]
  codes = ids[:, -(n + 1):-1]
  codes = np.where(codes == mask_id, mask_id, codes - offset)
  rec = {k: [] for k in ("trace_input_ids", "masking", "mask_len", "temperature")}
  gaps, cut_gaps = [], []
  for s in range(timesteps):
    rec["trace_input_ids"].append(ids.copy())
    if guidance > 0:
      un = np.concatenate([un_ids[:, :prefix_len], ids[:, prefix_len:]], 1)
      both, _ = reference.forward(sd, cfg, np.concatenate([ids, un]), _pair(np.concatenate([mask, un_mask])))
      logits = (1 + guidance) * both[:b] - guidance * both[b:]
    else:
      logits, _ = reference.forward(sd, cfg, ids, _pair(mask))
    probs = _softmax(logits[:, -(n + 1):-1, offset:offset + codebook])
    scores = np.log(probs) + gumbel_sample[s].reshape(b, n, codebook)
    top2 = np.sort(scores, -1)[..., -2:]
    gaps.append((top2[..., 1] - top2[..., 0]).min())
    unknown = codes == mask_id
    sampled = np.where(unknown, scores.argmax(-1), codes)
    sel = np.where(unknown, np.take_along_axis(probs, sampled[..., None], -1)[..., 0], np.finfo(np.float32).max)
    mask_len = np.maximum(1, np.minimum(unknown.sum(-1) - 1, _mask_len(n, s, timesteps)))
    temperature = temperature * (1 - (s + 1) / timesteps)
    conf = np.log(np.maximum(sel, 1e-20)) + temperature * gumbel_mask[s]
    srt = np.sort(conf, -1)
    cut = np.take_along_axis(srt, mask_len[:, None], -1)
    masking = conf < cut
    cut_gaps.append(min(srt[j, mask_len[j]] - srt[j, mask_len[j] - 1] for j in range(b)))
    ids[:, -(n + 1):-1] = np.where(masking, mask_id, sampled + offset)
    codes = np.where(masking, mask_id, sampled)
    for k, v in (("masking", masking), ("mask_len", mask_len), ("temperature", temperature)):
      rec[k].append(v)
  out = {k: np.stack(v) if k != "temperature" else np.asarray(v, np.float64) for k, v in rec.items()}
  out.update(final_input_ids=ids, output=sampled, margins=(float(min(gaps)), float(min(cut_gaps))))
  return out


def gumbel(rng: np.random.Generator, shape) -> np.ndarray:
  u = rng.random(shape)
  return (-np.log(np.maximum(-np.log(np.maximum(u, 1e-20)), 1e-20))).astype(np.float32)


# ---- synthetic fixture sets ------------------------------------------------------------------------------------------


def _toy_ids(vocab: int, codebook: int) -> dict:
  """Special ids of a synthetic set: the last text ids before the image codes."""
  t = vocab - codebook
  return {"image_offset": t, "ipad": t - 1, "eoi": t - 2, "soi": t - 3, "t2i": t - 4, "eos": t - 5, "bos": t - 6,
          "mask": t - 7, "n_plain": t - 7}


def _text_setting(sd, cfg, ids, spec, rng, out, index):
  """Draws prompts until every decision of the setting is far from a tie, then stores it (docs/parity.md §7 format)."""
  name, b, p = spec["name"], spec["batch"], spec["prompt_len"]
  for _ in range(50):
    prompt = np.concatenate([np.full((b, 1), ids["bos"]), rng.integers(0, ids["n_plain"], (b, p - 1))], 1)
    pmask = np.ones((b, p), np.int64)
    if spec.get("leftpad"):
      prompt[-1, :spec["leftpad"]], pmask[-1, :spec["leftpad"]] = ids["eos"], 0
    res, trace, margins = text_generate(sd, cfg, prompt, steps=spec["steps"], gen_length=spec["gen_length"],
                                        block_length=spec["block_length"], cfg_scale=spec["cfg_scale"],
                                        mask_id=ids["mask"], prompt_mask=pmask if spec.get("leftpad") else None)
    if margins["min_top1_top2_logit_gap_at_transferred"] > 1e-3 and margins["min_confidence_gap_at_topk_cut"] > 1e-4:
      break
  else:
    raise RuntimeError(f"no prompt with clear decisions for {name}")
  out.update({f"{name}__prompt": prompt, f"{name}__prompt_attention_mask": pmask, f"{name}__output": res,
              f"{name}__trace_x": trace})
  params = {k: spec[k] for k in ("steps", "gen_length", "block_length", "cfg_scale")}
  params.update(temperature=0.0, remasking="low_confidence", mask_id=ids["mask"],
                attention_mask="prompt_attention_mask + ones(gen_length)" if spec.get("leftpad") else None)
  index[name] = {"params": params, "n_model_calls": len(trace), "margins": margins}


def _t2i_layout(ids, rng, b, s, n):
  """t2i_gen rows of random captions (lengths 1 .. S-2) and the null prompt, with their attention masks."""
  rows, masks = [], []
  for _ in range(b):
    core = [ids["t2i"], ids["bos"]] + list(rng.integers(0, ids["n_plain"], rng.integers(1, s - 1))) + [ids["eos"]]
    prefix = [ids["ipad"]] * (s + 1 - len(core)) + core
    rows.append(prefix + [ids["soi"]] + [ids["mask"]] * n + [ids["eoi"]])
    masks.append([0] * (s + 1 - len(core)) + [1] * (len(core) + n + 2))
  null = [ids["ipad"]] * (s - 2) + [ids["t2i"], ids["bos"], ids["eos"], ids["soi"]] + [ids["mask"]] * n + [ids["eoi"]]
  null_mask = [0] * (s - 2) + [1] * (n + 5)
  return (np.asarray(rows), np.asarray(masks), np.asarray([null] * b), np.asarray([null_mask] * b))


def _t2i_runs(sd, cfg, ids, spec, rng, out, index):
  b, s, n, c = spec["batch"], spec["max_text_len"], spec["n_image"], spec["codebook"]
  layout = _t2i_layout(ids, rng, b, s, n)
  out.update(zip(("input_ids", "attention_mask", "uncond_input_ids", "uncond_attention_mask"), layout))
  for run in spec["runs"]:
    for _ in range(50):
      gs, gm = gumbel(rng, (run["timesteps"], b * n, c)), gumbel(rng, (run["timesteps"], b, n))
      res = t2i_generate(sd, cfg, *layout, guidance=run["guidance"], temperature=run["temperature"],
                         timesteps=run["timesteps"], n=n, codebook=c, offset=ids["image_offset"], mask_id=ids["mask"],
                         prefix_len=s + 1, gumbel_sample=gs, gumbel_mask=gm)
      if min(res["margins"]) > 1e-4:
        break
    else:
      raise RuntimeError(f"no noise draw with clear decisions for {run['name']}")
    name = run["name"]
    out.update({f"{name}__gumbel_sample": gs, f"{name}__gumbel_mask": gm})
    out.update({f"{name}__{k}": res[k] for k in ("trace_input_ids", "masking", "mask_len", "temperature",
                                                 "final_input_ids", "output")})
    index[name] = {"guidance_scale": run["guidance"], "temperature": run["temperature"],
                   "timesteps": run["timesteps"], "noise_schedule": "cosine", "seq_len": n, "codebook_size": c,
                   "text_vocab_len": ids["image_offset"], "resolution_arg": s, "mask_token_id": ids["mask"]}


def write_sampling_sets(directory: pathlib.Path, letter: str, *, model: dict, codebook: int, text: list[dict],
                        t2i: dict, seed: int = 0, with_index: bool = True) -> None:
  """Writes backbone_<letter>*, text_generate_<letter>.npz, t2i_generate_<letter>.npz and, with `with_index`, an
  index JSON in the official format (otherwise the tests must read the settings from names and shapes)."""
  stem = f"backbone_{letter}"
  sd, cfg = reference.write_fixture_set(directory, stem, seed=seed, **model)
  ids = _toy_ids(model["vocab"], codebook)
  cfg.update(mask_token_id=ids["mask"], llm_vocab_size=ids["image_offset"], codebook_size=codebook)
  (directory / f"{stem}_config.json").write_text(json.dumps(cfg, indent=2))
  rng = np.random.default_rng(seed + 100)
  text_out, text_index, t2i_out, t2i_index = {}, {}, {}, {}
  for spec in text:
    _text_setting(sd, cfg, ids, spec, rng, text_out, text_index)
  _t2i_runs(sd, cfg, ids, dict(t2i, codebook=codebook), rng, t2i_out, t2i_index)
  np.savez(directory / f"text_generate_{letter}.npz", **text_out)
  np.savez(directory / f"t2i_generate_{letter}.npz", **t2i_out)
  if with_index:
    index = {"weights": f"{stem}.safetensors", "config": f"{stem}_config.json",
             "text_generate": {"file": f"text_generate_{letter}.npz", "settings": text_index},
             "t2i_generate": {"file": f"t2i_generate_{letter}.npz", "runs": t2i_index}}
    (directory / f"sampling_fixtures_{letter}.json").write_text(json.dumps(index, indent=2))


def write_other_sets(directory: pathlib.Path) -> None:
  """Two synthetic sets of other shapes: G (with an index JSON) and H (settings only in names and shapes)."""
  write_sampling_sets(
      directory, "G", seed=3, codebook=32,
      model=dict(d=48, heads=6, kv_heads=3, layers=2, mlp=80, vocab=173, theta=10000.0),
      text=[dict(name="s1_block6_steps6", batch=3, prompt_len=6, gen_length=18, block_length=6, steps=6, cfg_scale=0.0),
            dict(name="s2_leftpad2_block12_steps5", batch=2, prompt_len=7, gen_length=12, block_length=12, steps=5,
                 cfg_scale=0.0, leftpad=2),
            dict(name="s3_cfg2.5_block8_steps4", batch=2, prompt_len=5, gen_length=16, block_length=8, steps=4,
                 cfg_scale=2.5)],
      t2i=dict(batch=2, max_text_len=5, n_image=16,
               runs=[dict(name="t1_nocfg_temp1", timesteps=5, guidance=0.0, temperature=1.0),
                     dict(name="t2_cfg2_temp0.5", timesteps=7, guidance=2.0, temperature=0.5)]))
  write_sampling_sets(
      directory, "H", seed=4, codebook=16, with_index=False,
      model=dict(d=32, heads=2, kv_heads=2, layers=1, mlp=40, vocab=97, theta=1e6),
      text=[dict(name="s1_cfg1_block4_steps6", batch=2, prompt_len=4, gen_length=12, block_length=4, steps=6,
                 cfg_scale=1.0)],
      t2i=dict(batch=3, max_text_len=4, n_image=9,
               runs=[dict(name="t1_cfg3_temp1", timesteps=4, guidance=3.0, temperature=1.0)]))


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
  """get(directory, stem, layout) -> (model, params, config) of a converted fixture backbone, cached per module."""
  cache = {}

  def get(directory, stem, layout="stacked"):
    if (directory, stem, layout) not in cache:
      if not (directory / f"{stem}.safetensors").exists():
        pytest.fail(f"{directory}: the sampler set needs {stem}.safetensors and {stem}_config.json")
      cache[directory, stem, layout] = load_backbone(directory, stem, tmp_path_factory.mktemp(stem), layout)
    return cache[directory, stem, layout]

  return get
