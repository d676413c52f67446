"""Official MAGVIT-v2 state dict (Show-o `showlab/magvitv2`, specs/mmada-official.md Appendix A) <-> our Flax tree.

Key mapping (our path -> official key): `down_{i}` -> `down.{i}`, `up_{i}` -> `up.{i}`, inside a level `block_{j}` ->
`block.{j}` and `attn_{j}` -> `attn.{j}`; the middle block keeps `mid.block_1`, `mid.attn_1`, `mid.block_2`.
Conv `kernel` [kh, kw, in, out] <-> `weight` (out, in, kh, kw); GroupNorm `scale` <-> `weight`; biases as they are.
The quantiser buffers `quantize.embedding` (2^bits, bits) and `quantize.power_vals` (bits,) hold no learnt values: they
are checked on import and recomputed on export (also when the source lacked them).

Conversion keeps the source dtypes and records in the checkpoint metadata what is needed to write the same safetensors
bytes back (tensor order, file metadata, buffer dtypes, config.json), plus the architecture (`kind: "magvit"`) so that a
load with a different architecture fails with a sentence naming the differing fields.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import ml_dtypes
import numpy as np

from mmada_jax import checkpoint as ckpt
from mmada_jax.convert import safetensors_io as st
from mmada_jax.models import magvit as mv

BUFFERS = ("quantize.embedding", "quantize.power_vals")
DEFAULT_FILENAME = "pytorch_model.safetensors"  # name the official loader looks for (spec §2)
TORCH_NAMES = ("pytorch_model.bin",)
STRUCT_FIELDS = ("channels", "in_channels", "encoder_channel_mult", "encoder_num_res_blocks", "decoder_channel_mult",
                 "decoder_num_res_blocks", "codebook_bits", "norm_groups", "norm_eps", "encoder_attn_levels",
                 "decoder_attn_levels")


class MagvitConversionError(ValueError):
  """The official state dict does not match the expected MAGVIT-v2 layout (keys, shapes or buffers)."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading official weights


class StateDict:
  """Uniform access to an official state dict: `shapes`, `dtypes`, `get(key)`, plus what export needs back."""

  def __init__(self, shapes: dict, dtypes: dict, getter: Callable[[str], np.ndarray], *, order: list[str],
               file_metadata: dict | None, filename: str, config_json: dict | None, fmt: str):
    self.shapes, self.dtypes, self.get = shapes, dtypes, getter
    self.order, self.file_metadata, self.filename = order, file_metadata, filename
    self.config_json, self.format = config_json, fmt


def _torch_state_dict(path: str, config_json: dict | None) -> StateDict:
  try:
    import torch
  except ImportError:
    raise MagvitConversionError(
        f"{path} is a PyTorch pickle; reading it needs torch (`pip install torch`), or supply the weights as "
        f".safetensors instead") from None
  sd = torch.load(path, map_location="cpu", weights_only=True)
  sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
  arrays = {}
  for k, t in sd.items():
    t = t.detach().cpu().contiguous()
    arrays[k] = (t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy())
  specs = {k: (a.shape, a.dtype) for k, a in arrays.items()}
  return StateDict({k: tuple(a.shape) for k, a in arrays.items()}, {k: a.dtype for k, a in arrays.items()},
                   arrays.__getitem__, order=st.canonical_order(specs), file_metadata=None,
                   filename=DEFAULT_FILENAME, config_json=config_json, fmt="pytorch_bin")


def read_official(src: str) -> StateDict:
  """Opens `src`: a `.safetensors` file, a `.bin` file (needs torch), or a directory holding either."""
  config_json = None
  if os.path.isdir(src):
    cfg_path = os.path.join(src, "config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        config_json = json.load(f)
    has_st = any(n.endswith(".safetensors") for n in os.listdir(src))
    if not has_st:
      for name in TORCH_NAMES:
        if os.path.exists(os.path.join(src, name)):
          return _torch_state_dict(os.path.join(src, name), config_json)
      raise MagvitConversionError(f"{src}: no *.safetensors file and no {' / '.join(TORCH_NAMES)}")
    d = st.CheckpointDir(src)
    order = [k for f in d.files.values() for k in f.order()]
    single = next(iter(d.files.values())) if len(d.files) == 1 else None
    return StateDict({k: d.info(k).shape for k in d.keys()}, {k: d.info(k).np_dtype for k in d.keys()}, d.get,
                     order=order, file_metadata=single.metadata if single else None,
                     filename=next(iter(d.files)) if single else DEFAULT_FILENAME, config_json=config_json,
                     fmt="safetensors")
  if not os.path.exists(src):
    raise MagvitConversionError(f"MAGVIT weights not found: {src}")
  if src.endswith((".bin", ".pt", ".pth")):
    return _torch_state_dict(src, None)
  f = st.SafetensorsFile(src)
  return StateDict({k: t.shape for k, t in f.tensors.items()}, {k: t.np_dtype for k, t in f.tensors.items()}, f.get,
                   order=f.order(), file_metadata=f.metadata, filename=os.path.basename(src), config_json=None,
                   fmt="safetensors")


# ----------------------------------------------------------------------------------------------------------------------
# Architecture


def _need(shapes: Mapping[str, tuple], key: str, why: str) -> tuple:
  if key not in shapes:
    raise MagvitConversionError(f"cannot infer the MAGVIT architecture: key {key!r} ({why}) is missing")
  return tuple(shapes[key])


def _levels(shapes: Mapping[str, tuple], prefix: str) -> tuple[list[int], list[bool]]:
  """Residual blocks per level and whether a level has attention, from `{prefix}.{i}.block.{j}.` keys."""
  pat = re.compile(re.escape(prefix) + r"\.(\d+)\.(block|attn)\.(\d+)\.")
  found: dict[int, dict[str, set]] = {}
  for k in shapes:
    m = pat.match(k)
    if m:
      found.setdefault(int(m.group(1)), {"block": set(), "attn": set()})[m.group(2)].add(int(m.group(3)))
  if not found:
    raise MagvitConversionError(f"cannot infer the MAGVIT architecture: no '{prefix}.<level>.block.<j>.*' keys")
  n = max(found) + 1
  missing = [i for i in range(n) if i not in found]
  if missing:
    raise MagvitConversionError(f"{prefix}: levels {missing} have no residual blocks (levels 0..{n - 1} expected)")
  return [max(found[i]["block"]) + 1 for i in range(n)], [bool(found[i]["attn"]) for i in range(n)]


def _mults(shapes: Mapping[str, tuple], prefix: str, n: int, ch: int) -> list[int]:
  mults = []
  for i in range(n):
    width = _need(shapes, f"{prefix}.{i}.block.0.conv1.weight", "width of the level")[0]
    if width % ch:
      raise MagvitConversionError(f"{prefix}.{i}: width {width} is not a multiple of the base width {ch} "
                                  f"(encoder.conv_in.weight)")
    mults.append(width // ch)
  return mults


def infer_structure(shapes: Mapping[str, tuple]) -> dict[str, Any]:
  """Architecture facts readable from state-dict keys/shapes (no resolution, norm groups or eps)."""
  ch, in_ch = _need(shapes, "encoder.conv_in.weight", "base width and input channels")[:2]
  bits = _need(shapes, "encoder.conv_out.weight", "latent channels = codebook bits")[0]
  enc_blocks, enc_attn = _levels(shapes, "encoder.down")
  dec_blocks, dec_attn = _levels(shapes, "decoder.up")
  return {
      "channels": ch, "in_channels": in_ch, "codebook_bits": bits,
      "encoder_channel_mult": _mults(shapes, "encoder.down", len(enc_blocks), ch), "encoder_num_res_blocks": enc_blocks,
      "decoder_channel_mult": _mults(shapes, "decoder.up", len(dec_blocks), ch), "decoder_num_res_blocks": dec_blocks,
      "encoder_attn_levels": [i for i, a in enumerate(enc_attn) if a],
      "decoder_attn_levels": [i for i, a in enumerate(dec_attn) if a],
  }


def structure_of(cfg: mv.MagvitConfig) -> dict[str, Any]:
  """The fields of STRUCT_FIELDS for a config (lists, JSON-friendly)."""
  arch = cfg.arch_dict()
  out = {k: arch[k] for k in STRUCT_FIELDS if k in arch}
  out["encoder_attn_levels"] = [i for i, a in enumerate(cfg.encoder_attn_levels()) if a]
  out["decoder_attn_levels"] = [i for i, a in enumerate(cfg.decoder_attn_levels()) if a]
  return out


def config_from_structure(struct: Mapping[str, Any], base: mv.MagvitConfig | None = None) -> mv.MagvitConfig:
  """A MagvitConfig with the inferred structure; resolution, norms and dtypes from `base` (default: official)."""
  base = base or mv.MagvitConfig()
  levels = set(struct["encoder_attn_levels"])
  if levels != set(struct["decoder_attn_levels"]):
    raise MagvitConversionError(f"encoder attention at levels {sorted(levels)} but decoder at "
                                f"{struct['decoder_attn_levels']}: not expressible with one attn_resolutions list")
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in struct.items() if not k.endswith("attn_levels")}
  return mv.MagvitConfig(**{**base.__dict__, **kw,
                            "attn_resolutions": tuple(base.resolution >> i for i in sorted(levels))})


def config_from_official_kwargs(kwargs: Mapping[str, Any], **overrides) -> mv.MagvitConfig:
  """MagvitConfig from the official constructor arguments {"encoder": {...}, "decoder": {...}, "quantize": {...}}."""
  enc, dec, q = kwargs["encoder"], kwargs["decoder"], kwargs["quantize"]
  for key in ("ch", "z_channels", "resolution", "attn_resolutions"):
    if enc[key] != dec[key]:
      raise MagvitConversionError(f"encoder.{key}={enc[key]} differs from decoder.{key}={dec[key]}; "
                                  f"the magvit config has one value for both")
  if enc["in_ch"] != dec["out_ch"] or q["codebook_dim"] != enc["z_channels"]:
    raise MagvitConversionError(f"in_ch={enc['in_ch']}/out_ch={dec['out_ch']} or codebook_dim={q['codebook_dim']}/"
                                f"z_channels={enc['z_channels']} disagree")
  return mv.MagvitConfig(**{
      "channels": enc["ch"], "in_channels": enc["in_ch"], "encoder_channel_mult": tuple(enc["ch_mult"]),
      "encoder_num_res_blocks": tuple(enc["num_res_blocks"]), "decoder_channel_mult": tuple(dec["ch_mult"]),
      "decoder_num_res_blocks": tuple(dec["num_res_blocks"]), "codebook_bits": q["codebook_dim"],
      "resolution": enc["resolution"], "attn_resolutions": tuple(enc["attn_resolutions"]), "beta": q["beta"],
      "commit_multiplier": q["commit_loss_multiplier"], "entropy_multiplier": q["entropy_multiplier"], **overrides})


def _as_config(config: Any) -> mv.MagvitConfig | None:
  if config is None or isinstance(config, mv.MagvitConfig):
    return config
  return mv.MagvitConfig.from_config(config)  # a `magvit` ConfigDict section or a plain mapping


def _check_structure(found: Mapping[str, Any], want: Mapping[str, Any], where: str) -> None:
  diffs = [f"magvit.{k}: {where} has {found[k]!r}, config has {want[k]!r}" for k in want if found.get(k) != want[k]]
  if diffs:
    raise MagvitConversionError(f"{where} does not match the requested MAGVIT architecture:\n  " + "\n  ".join(diffs))


# ----------------------------------------------------------------------------------------------------------------------
# Key mapping


def official_key(path: tuple[str, ...]) -> str:
  """Our parameter path, e.g. ('encoder', 'down_1', 'block_0', 'conv1', 'kernel') -> official state-dict key."""
  parts = []
  for i, name in enumerate(path):
    parent = path[i - 1] if i else ""
    if re.fullmatch(r"(down|up)_\d+", name) or (re.fullmatch(r"(block|attn)_\d+", name) and
                                                re.fullmatch(r"(down|up)_\d+", parent)):
      name = name.replace("_", ".")
    elif i == len(path) - 1:
      name = {"kernel": "weight", "scale": "weight"}.get(name, name)
    parts.append(name)
  return ".".join(parts)


def _to_official_shape(shape: tuple) -> tuple:
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def expected_keys(cfg: mv.MagvitConfig) -> dict[str, tuple[tuple[str, ...], tuple]]:
  """Official parameter key -> (our path, official shape) for every parameter of `cfg` (buffers excluded)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(mv.param_shapes(cfg))[0]:
    names = tuple(p.key for p in path)
    out[official_key(names)] = (names, _to_official_shape(leaf.shape))
  return out


def _check_keys(sd: StateDict, expected: Mapping[str, tuple], where: str) -> None:
  missing = sorted(set(expected) - set(sd.shapes))
  unexpected = sorted(set(sd.shapes) - set(expected) - set(BUFFERS))
  bad = [f"{k}: checkpoint {list(sd.shapes[k])}, model expects {list(expected[k][1])}" for k in sorted(expected)
         if k in sd.shapes and tuple(sd.shapes[k]) != tuple(expected[k][1])]
  lines = ([f"missing keys ({len(missing)}): {missing}"] if missing else []) + \
          ([f"unexpected keys ({len(unexpected)}): {unexpected}"] if unexpected else []) + \
          ([f"shape mismatches ({len(bad)}):"] + [f"  {b}" for b in bad] if bad else [])
  if lines:
    raise MagvitConversionError(f"{where}: state dict does not match the MAGVIT model:\n  " + "\n  ".join(lines))


def _check_buffers(sd: StateDict, bits: int, where: str) -> None:
  want = {"quantize.embedding": mv.codebook_embedding(bits), "quantize.power_vals": mv.power_vals(bits)}
  for key, ref in want.items():
    if key not in sd.shapes:
      continue
    got = np.asarray(sd.get(key))
    if got.shape != ref.shape or not np.array_equal(got.astype(ref.dtype), ref):
      raise MagvitConversionError(f"{where}: buffer {key} {got.dtype}{list(got.shape)} is not the {bits}-bit "
                                  f"{'codebook' if 'embedding' in key else 'bit weights'} {ref.dtype}{list(ref.shape)}")


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def official_to_params(sd: StateDict, cfg: mv.MagvitConfig, where: str = "state dict") -> dict:
  """Checks keys/shapes/buffers and returns our parameter tree (numpy, source dtypes)."""
  expected = expected_keys(cfg)
  _check_keys(sd, expected, where)
  _check_buffers(sd, cfg.codebook_bits, where)
  flat = {}
  for key, (path, _) in expected.items():
    a = np.asarray(sd.get(key))
    flat[path] = np.ascontiguousarray(a.transpose(2, 3, 1, 0) if a.ndim == 4 else a)
  return _nest(flat)


def params_to_official(params: Mapping, cfg: mv.MagvitConfig,
                       buffer_dtypes: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
  """Our parameter tree -> official state dict (numpy), buffers recomputed."""
  expected = expected_keys(cfg)
  out = {}
  for key, (path, shape) in expected.items():
    node = params
    for p in path:
      if p not in node:
        raise MagvitConversionError(f"parameter tree lacks {'/'.join(path)} (official {key})")
      node = node[p]
    a = np.asarray(node)
    a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a
    if a.shape != tuple(shape):
      raise MagvitConversionError(f"{'/'.join(path)}: shape {list(a.shape)} gives {key} {list(a.shape)}, "
                                  f"model expects {list(shape)}")
    out[key] = a
  dt = {"quantize.embedding": "float32", "quantize.power_vals": "int64", **(buffer_dtypes or {})}
  out["quantize.embedding"] = mv.codebook_embedding(cfg.codebook_bits).astype(dt["quantize.embedding"])
  out["quantize.power_vals"] = mv.power_vals(cfg.codebook_bits).astype(dt["quantize.power_vals"])
  return out


# ----------------------------------------------------------------------------------------------------------------------
# Orbax checkpoints


def _metadata(cfg: mv.MagvitConfig, sd: StateDict) -> dict:
  return {
      "kind": "magvit",
      "magvit": {**cfg.arch_dict(), **structure_of(cfg)},
      "source": {"format": sd.format, "filename": sd.filename},
      "export": {
          "filename": sd.filename if sd.filename.endswith(".safetensors") else DEFAULT_FILENAME,
          "order": list(sd.order),
          "file_metadata": sd.file_metadata,
          "buffer_dtypes": {k: np.dtype(sd.dtypes[k]).name for k in BUFFERS if k in sd.dtypes},
          "config_json": sd.config_json,
      },
  }


def convert_magvit_to_orbax(src: str, dst: str, *, config: Any = None, overwrite: bool = False) -> dict:
  """Official MAGVIT-v2 weights (`src`: .safetensors / .bin / directory) -> Orbax parameter checkpoint `dst`.

  Args:
    config: optional MagvitConfig or `magvit` config section; its architecture must match the weights (else an error
      lists the differing fields). Without it the architecture is inferred from the keys and shapes, with the official
      resolution / norm settings.
  Returns:
    The metadata written with the checkpoint.
  """
  sd = read_official(src)
  struct = infer_structure(sd.shapes)
  cfg = _as_config(config)
  if cfg is not None:
    _check_structure(struct, {k: v for k, v in structure_of(cfg).items() if k in struct}, src)
  else:
    cfg = config_from_structure(struct)
  params = official_to_params(sd, cfg, where=src)
  meta = _metadata(cfg, sd)
  ckpt.save_params(dst, params, meta, overwrite=overwrite)
  return meta


def load_magvit(path: str, config: Any = None, *, as_numpy: bool = False) -> tuple[dict, mv.MagvitConfig]:
  """Restores (params, MagvitConfig) from an Orbax MAGVIT checkpoint, checking the architecture against `config`."""
  meta = ckpt.read_metadata(path)
  if meta.get("kind") != "magvit":
    raise ckpt.CheckpointError(f"{path}: checkpoint kind is {meta.get('kind')!r}, expected 'magvit'")
  cfg = _as_config(config)
  expected = {"kind": "magvit"}
  if cfg is not None:
    expected.update({f"magvit.{k}": v for k, v in structure_of(cfg).items()})
  params, meta = ckpt.load_params(path, expected=expected, as_numpy=as_numpy)
  if cfg is None:
    saved = meta["magvit"]
    cfg = mv.MagvitConfig(**{k: tuple(saved[k]) if isinstance(saved[k], list) else saved[k]
                             for k in mv.MagvitConfig.ARCH_FIELDS})
  return params, cfg


def export_magvit(src_orbax: str, dst_dir: str, *, filename: str | None = None, config: Any = None,
                  overwrite: bool = False) -> str:
  """Orbax MAGVIT checkpoint -> `dst_dir/<filename>` official safetensors (+ config.json). Returns the file path.

  A checkpoint converted from official safetensors is written back byte for byte (recorded tensor order and file
  metadata; buffers recomputed in their recorded dtypes); a trained one in the reference library's canonical order.
  """
  params, cfg = load_magvit(src_orbax, config, as_numpy=True)
  meta = ckpt.read_metadata(src_orbax)
  exp = meta.get("export") or {}
  state = params_to_official(params, cfg, exp.get("buffer_dtypes"))
  specs = {k: (a.shape, a.dtype) for k, a in state.items()}
  order = exp.get("order") or []
  if sorted(order) != sorted(specs):
    order = st.canonical_order(specs)
  path = os.path.join(dst_dir, filename or exp.get("filename") or DEFAULT_FILENAME)
  if os.path.exists(path) and not overwrite:
    raise ckpt.CheckpointError(f"{path} already exists; refusing to overwrite it (choose another output directory)")
  os.makedirs(dst_dir, exist_ok=True)
  st.write_file(path, order, specs, state.__getitem__, exp.get("file_metadata"))
  cfg_json = exp.get("config_json") or {"_class_name": "MAGVITv2"}
  cfg_path = os.path.join(dst_dir, "config.json")
  if overwrite or not os.path.exists(cfg_path):
    with open(cfg_path, "w") as f:
      json.dump(cfg_json, f, indent=2)
  return path
