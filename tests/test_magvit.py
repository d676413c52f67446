"""MAGVIT-v2 tokenizer: parity with the official PyTorch outputs for every fixture set, conversion round trips, errors.

Every `magvit_<name>.safetensors` in the parity directory (MMADA_PARITY_DIR overrides it) with its
`magvit_<name>_config.json` and `magvit_<name>_io.npz` is one parametrisation; everything (architecture, image size,
codebook size, loss multipliers) is read from those files.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import parity_dir
from mmada_jax import checkpoint as ckpt
from mmada_jax.convert import magvit as cm
from mmada_jax.convert import safetensors_io as st
from mmada_jax.models import magvit as mv


def _stems() -> list[str]:
  d = parity_dir()
  if not d.is_dir():
    return []
  return sorted(p.name[:-len(".safetensors")] for p in d.glob("magvit_*.safetensors"))


STEMS = _stems()


def test_fixture_sets_present():
  assert STEMS, f"no MAGVIT fixture set (magvit_<name>.safetensors + _config.json + _io.npz) in {parity_dir()}"


def _official_kwargs(stem: str) -> dict:
  path = parity_dir() / f"{stem}_config.json"
  assert path.exists(), f"{stem}: {path.name} missing"
  doc = json.loads(path.read_text())
  name = stem[len("magvit_"):]
  if name in doc:
    return doc[name]
  if "encoder" in doc:
    return doc
  keys = [k for k in doc if k != "official_defaults"]
  assert len(keys) == 1, f"{path.name}: cannot tell which entry of {sorted(doc)} describes {stem}"
  return doc[keys[0]]


_CACHE: dict = {}


@pytest.fixture
def fixture_set(request, tmp_path_factory):
  """Converted weights, config and io arrays of one set (converted once per set)."""
  stem = request.param
  if stem not in _CACHE:
    d = parity_dir()
    io_path = d / f"{stem}_io.npz"
    assert io_path.exists(), f"{stem}: {io_path.name} missing"
    cfg = cm.config_from_official_kwargs(_official_kwargs(stem))
    out = tmp_path_factory.mktemp(stem) / "orbax"
    cm.convert_magvit_to_orbax(str(d / f"{stem}.safetensors"), str(out), config=cfg)
    params, loaded_cfg = cm.load_magvit(str(out), cfg)
    _CACHE[stem] = dict(cfg=loaded_cfg, params=params, io=dict(np.load(io_path)), orbax=str(out),
                        src=str(d / f"{stem}.safetensors"))
  return _CACHE[stem]


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("fixture_set", STEMS, indirect=True, ids=STEMS)
def test_parity_encode_indices_decode(fixture_set):
  cfg, params, io = fixture_set["cfg"], fixture_set["params"], fixture_set["io"]
  model = mv.MagvitV2(cfg)
  variables = {"params": params}
  z = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, _nhwc(io["images"]))
  np.testing.assert_allclose(_nchw(z), io["encoder_output"], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(_nchw(mv.lfq_quantize(z)), io["quantized_z"])
  indices = np.asarray(mv.codes_to_indices(z))
  np.testing.assert_array_equal(indices, io["indices"])
  latent_hw = io["encoder_output"].shape[2:]
  decoded = jax.jit(lambda v, i: model.apply(v, i, latent_hw, method="decode_code"))(
      variables, jnp.asarray(io["indices"]))
  np.testing.assert_allclose(_nchw(decoded), io["decoded"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("fixture_set", STEMS, indirect=True, ids=STEMS)
def test_parity_quantizer_losses(fixture_set):
  cfg, io = fixture_set["cfg"], fixture_set["io"]
  _, aux = mv.lfq(_nhwc(io["encoder_output"]), cfg.beta, cfg.commit_multiplier, cfg.entropy_multiplier)
  np.testing.assert_allclose(float(aux["quantizer_loss"]), float(io["quantizer_loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(aux["entropy_loss"]), float(io["entropy_loss"]), rtol=1e-5, atol=1e-8)
  np.testing.assert_array_equal(np.asarray(aux["indices"]), io["indices"])


@pytest.mark.parametrize("fixture_set", STEMS, indirect=True, ids=STEMS)
def test_structure_inferred_from_state_dict(fixture_set):
  sd = cm.read_official(fixture_set["src"])
  want = cm.structure_of(fixture_set["cfg"])
  assert cm.infer_structure(sd.shapes) == {k: want[k] for k in cm.infer_structure(sd.shapes)}


@pytest.mark.parametrize("fixture_set", STEMS, indirect=True, ids=STEMS)
def test_export_round_trip_is_byte_identical(fixture_set, tmp_path):
  path = cm.export_magvit(fixture_set["orbax"], str(tmp_path / "out"))
  with open(path, "rb") as a, open(fixture_set["src"], "rb") as b:
    assert a.read() == b.read()
  meta = ckpt.read_metadata(fixture_set["orbax"])
  assert meta["kind"] == "magvit" and meta["magvit"]["channels"] == fixture_set["cfg"].channels


@pytest.mark.parametrize("fixture_set", STEMS, indirect=True, ids=STEMS)
def test_buffers_recomputed_when_absent(fixture_set, tmp_path):
  src = st.SafetensorsFile(fixture_set["src"])
  keep = {k: (t.shape, t.np_dtype) for k, t in src.tensors.items() if k not in cm.BUFFERS}
  no_buf = tmp_path / "nobuf.safetensors"
  st.write_file(str(no_buf), st.canonical_order(keep), keep, src.get)
  cm.convert_magvit_to_orbax(str(no_buf), str(tmp_path / "ck"))  # architecture inferred, no config
  out = cm.export_magvit(str(tmp_path / "ck"), str(tmp_path / "out"), filename="m.safetensors")
  back = st.SafetensorsFile(out)
  for key in cm.BUFFERS:
    np.testing.assert_array_equal(back.get(key), src.get(key))
    assert back.tensors[key].dtype == src.tensors[key].dtype
  if src.order() == st.canonical_order({k: (t.shape, t.np_dtype) for k, t in src.tensors.items()}):
    with open(out, "rb") as a, open(fixture_set["src"], "rb") as b:
      assert a.read() == b.read()


# ----------------------------------------------------------------------------------------------------------------------
# Error messages (on the first fixture set)


def _rewrite(src_path: str, dst, drop=(), add=None, replace=None):
  src = st.SafetensorsFile(src_path)
  arrays = {k: np.asarray(src.get(k)) for k in src.tensors if k not in drop}
  arrays.update(add or {})
  arrays.update(replace or {})
  specs = {k: (a.shape, a.dtype) for k, a in arrays.items()}
  st.write_file(str(dst), st.canonical_order(specs), specs, arrays.__getitem__)
  return str(dst)


@pytest.fixture
def first_src():
  assert STEMS, "no MAGVIT fixture set"
  return str(parity_dir() / f"{STEMS[0]}.safetensors")


def test_missing_unexpected_and_misshapen_keys_are_listed(first_src, tmp_path):
  src = st.SafetensorsFile(first_src)
  attn_q = "encoder.mid.attn_1.q.weight"
  c = src.tensors[attn_q].shape[0]
  bad = _rewrite(first_src, tmp_path / "bad.safetensors", drop=("encoder.conv_in.bias",),
                 add={"encoder.extra.weight": np.zeros((2,), np.float32)},
                 replace={attn_q: np.zeros((c, c, 3, 3), np.float32)})
  with pytest.raises(cm.MagvitConversionError) as e:
    cm.convert_magvit_to_orbax(bad, str(tmp_path / "ck"))
  msg = str(e.value)
  assert "missing keys (1): ['encoder.conv_in.bias']" in msg
  assert "unexpected keys (1): ['encoder.extra.weight']" in msg
  assert f"{attn_q}: checkpoint [{c}, {c}, 3, 3], model expects [{c}, {c}, 1, 1]" in msg
  assert not (tmp_path / "ck").exists()


def test_config_mismatch_is_named(first_src, tmp_path):
  cfg = cm.config_from_structure(cm.infer_structure(cm.read_official(first_src).shapes))
  wrong = mv.MagvitConfig(**{**cfg.__dict__, "channels": cfg.channels * 2, "codebook_bits": cfg.codebook_bits + 1})
  with pytest.raises(cm.MagvitConversionError, match=r"magvit\.channels: .* has %d, config has %d"
                     % (cfg.channels, cfg.channels * 2)) as e:
    cm.convert_magvit_to_orbax(first_src, str(tmp_path / "ck"), config=wrong)
  assert "magvit.codebook_bits" in str(e.value)
  cm.convert_magvit_to_orbax(first_src, str(tmp_path / "ck"), config=cfg)
  with pytest.raises(ckpt.CheckpointError, match=r"magvit\.channels: checkpoint has %d, expected %d"
                     % (cfg.channels, cfg.channels * 2)):
    cm.load_magvit(str(tmp_path / "ck"), wrong)
  with pytest.raises(ckpt.CheckpointError, match="already exists"):
    cm.convert_magvit_to_orbax(first_src, str(tmp_path / "ck"), config=cfg)


def test_wrong_buffer_is_rejected(first_src, tmp_path):
  src = st.SafetensorsFile(first_src)
  pv = np.asarray(src.get("quantize.power_vals"))[::-1].copy()
  bad = _rewrite(first_src, tmp_path / "bad.safetensors", replace={"quantize.power_vals": pv})
  with pytest.raises(cm.MagvitConversionError, match="buffer quantize.power_vals"):
    cm.convert_magvit_to_orbax(bad, str(tmp_path / "ck"))


def test_torch_pickle_without_torch_says_how_to_fix(tmp_path, monkeypatch):
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail whether or not torch is installed
  for src in (tmp_path, tmp_path / "pytorch_model.bin"):
    with pytest.raises(cm.MagvitConversionError, match=r"pip install torch.*safetensors"):
      cm.read_official(str(src))


def test_missing_source_is_named(tmp_path):
  with pytest.raises(cm.MagvitConversionError, match="nothing_here"):
    cm.read_official(str(tmp_path / "nothing_here.safetensors"))
  with pytest.raises(cm.MagvitConversionError, match="no \\*.safetensors"):
    cm.read_official(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# Architectures beyond the fixtures: an independent float64 NumPy evaluation of the official semantics
# (docs/parity.md §9, checked against every fixture set below) versus the Flax model after conversion.


def _np_conv(x, sd, key, stride=1, pad=(1, 1, 1, 1)):
  """x [B, C, H, W]; weight (O, I, kh, kw); pad = (top, bottom, left, right)."""
  w, b = sd[key + ".weight"].astype(np.float64), sd[key + ".bias"].astype(np.float64)
  x = np.pad(x, ((0, 0), (0, 0), pad[:2], pad[2:]))
  kh, kw = w.shape[2:]
  oh, ow = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], oh, ow))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("bchw,oc->bohw", x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride], w[:, :, i, j])
  return out + b[None, :, None, None]


def _np_gn(x, sd, key, groups=32, eps=1e-6):
  b, c, h, w = x.shape
  g = x.reshape(b, groups, -1)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
  return g.reshape(b, c, h, w) * sd[key + ".weight"][None, :, None, None] + sd[key + ".bias"][None, :, None, None]


def _swish(x):
  return x / (1 + np.exp(-x))


def _np_res(x, sd, p):
  h = _np_conv(_swish(_np_gn(x, sd, p + ".norm1")), sd, p + ".conv1")
  h = _np_conv(_swish(_np_gn(h, sd, p + ".norm2")), sd, p + ".conv2")
  if p + ".nin_shortcut.weight" in sd:
    x = _np_conv(x, sd, p + ".nin_shortcut", pad=(0, 0, 0, 0))
  return x + h


def _np_attn(x, sd, p):
  b, c, h, w = x.shape
  hn = _np_gn(x, sd, p + ".norm")
  q, k, v = (_np_conv(hn, sd, f"{p}.{n}", pad=(0, 0, 0, 0)).reshape(b, c, h * w) for n in "qkv")
  s = np.einsum("bci,bcj->bij", q, k) * c ** -0.5
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  out = np.einsum("bij,bcj->bci", a, v).reshape(b, c, h, w)
  return x + _np_conv(out, sd, p + ".proj_out", pad=(0, 0, 0, 0))


def _np_mid(x, sd, p):
  return _np_res(_np_attn(_np_res(x, sd, p + ".block_1"), sd, p + ".attn_1"), sd, p + ".block_2")


def _np_encoder(sd, kw, x):
  h = _np_conv(x, sd, "encoder.conv_in")
  res, n = kw["resolution"], len(kw["ch_mult"])
  for i in range(n):
    for j in range(kw["num_res_blocks"][i]):
      h = _np_res(h, sd, f"encoder.down.{i}.block.{j}")
      if res in kw["attn_resolutions"]:
        h = _np_attn(h, sd, f"encoder.down.{i}.attn.{j}")
    if i != n - 1:
      h = _np_conv(h, sd, f"encoder.down.{i}.downsample.conv", stride=2, pad=(0, 1, 0, 1))
      res //= 2
  h = _np_conv(_swish(_np_gn(_np_mid(h, sd, "encoder.mid"), sd, "encoder.norm_out")), sd, "encoder.conv_out")
  return _np_conv(h, sd, "encoder.quant_conv", pad=(0, 0, 0, 0))


def _np_decoder(sd, kw, zq):
  h = _np_conv(_np_conv(zq, sd, "decoder.post_quant_conv", pad=(0, 0, 0, 0)), sd, "decoder.conv_in")
  h = _np_mid(h, sd, "decoder.mid")
  n = len(kw["ch_mult"])
  res = kw["resolution"] // 2 ** (n - 1)
  for i in reversed(range(n)):
    for j in range(kw["num_res_blocks"][i]):
      h = _np_res(h, sd, f"decoder.up.{i}.block.{j}")
      if res in kw["attn_resolutions"]:
        h = _np_attn(h, sd, f"decoder.up.{i}.attn.{j}")
    if i != 0:
      h = _np_conv(h.repeat(2, axis=2).repeat(2, axis=3), sd, f"decoder.up.{i}.upsample.conv")
      res *= 2
  return _np_conv(_swish(_np_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out")


def _np_indices(z):
  bits = z.shape[1]
  idx = np.tensordot((z > 0).astype(np.int64), 2 ** np.arange(bits - 1, -1, -1), axes=([1], [0]))
  return idx.reshape(z.shape[0], -1)


def _np_decode_code(sd, kw, indices, hw):
  bits = kw["z_channels"]
  codes = ((indices[..., None] >> np.arange(bits - 1, -1, -1)) & 1) * 2.0 - 1.0
  return _np_decoder(sd, kw, codes.reshape(indices.shape[0], hw[0], hw[1], bits).transpose(0, 3, 1, 2))


@pytest.mark.parametrize("stem", STEMS, ids=STEMS)
def test_numpy_reference_matches_official(stem):
  """The reference below reproduces the stored official outputs, so it can judge architectures no fixture has."""
  kw = _official_kwargs(stem)
  src = st.SafetensorsFile(str(parity_dir() / f"{stem}.safetensors"))
  sd = {k: np.asarray(src.get(k), np.float64) for k in src.tensors}
  io = np.load(parity_dir() / f"{stem}_io.npz")
  z = _np_encoder(sd, kw["encoder"], io["images"].astype(np.float64))
  np.testing.assert_allclose(z, io["encoder_output"], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(_np_indices(z), io["indices"])
  dec = _np_decode_code(sd, kw["decoder"], io["indices"], z.shape[2:])
  np.testing.assert_allclose(dec, io["decoded"], atol=1e-4, rtol=0)


def _official_kwargs_of(cfg: mv.MagvitConfig) -> dict:
  side = dict(ch=cfg.channels, resolution=cfg.resolution, attn_resolutions=list(cfg.attn_resolutions),
              z_channels=cfg.codebook_bits)
  return {"encoder": dict(side, ch_mult=list(cfg.encoder_channel_mult), num_res_blocks=list(cfg.encoder_num_res_blocks),
                          in_ch=cfg.in_channels),
          "decoder": dict(side, ch_mult=list(cfg.decoder_channel_mult), num_res_blocks=list(cfg.decoder_num_res_blocks),
                          out_ch=cfg.in_channels),
          "quantize": dict(codebook_dim=cfg.codebook_bits, beta=0.25, entropy_multiplier=0.1,
                           commit_loss_multiplier=0.1)}


def test_other_architecture_against_numpy_reference(tmp_path):
  """4 levels, per-level attention at 8x8 (encoder level 2 / decoder level 2), 5 bits, a non-square 32x24 image."""
  cfg = mv.MagvitConfig(channels=32, encoder_channel_mult=(1, 2, 1, 2), encoder_num_res_blocks=(1, 2, 1, 1),
                        decoder_channel_mult=(2, 1, 2, 1), decoder_num_res_blocks=(1, 1, 2, 1), codebook_bits=5,
                        resolution=32, attn_resolutions=(8,))
  assert cfg.encoder_attn_levels() == (False, False, True, False)
  rng = np.random.default_rng(0)
  def draw(path, leaf):  # kernels N(0, 1/fan_in); norm scales 1 + 0.2 N(0, 1); biases 0.2 N(0, 1) (as the fixtures)
    name, shape = path[-1].key, leaf.shape
    scale = np.prod(shape[:-1]) ** -0.5 if name == "kernel" else 0.2
    return ((name == "scale") + scale * rng.standard_normal(shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, mv.param_shapes(cfg))
  state = cm.params_to_official(params, cfg)
  specs = {k: (a.shape, a.dtype) for k, a in state.items()}
  src = tmp_path / "other.safetensors"
  st.write_file(str(src), st.canonical_order(specs), specs, state.__getitem__)
  cm.convert_magvit_to_orbax(str(src), str(tmp_path / "ck"), config=cfg)
  loaded, _ = cm.load_magvit(str(tmp_path / "ck"), cfg)
  images = rng.uniform(-1, 1, (2, 3, 32, 24))
  kw = _official_kwargs_of(cfg)
  sd64 = {k: np.asarray(v, np.float64) for k, v in state.items()}
  z_ref = _np_encoder(sd64, kw["encoder"], images)
  model = mv.MagvitV2(cfg)
  z = jax.jit(lambda v, x: model.apply(v, x, method="encode"))({"params": loaded}, _nhwc(images.astype(np.float32)))
  assert z.shape == (2, 4, 3, 5)
  np.testing.assert_allclose(_nchw(z), z_ref, atol=1e-4, rtol=0)
  clear = np.abs(z_ref).min(axis=1).reshape(2, -1) > 1e-4  # positions where float32 noise cannot flip a bit
  assert clear.mean() > 0.9
  ref_idx = _np_indices(z_ref)
  np.testing.assert_array_equal(np.asarray(mv.codes_to_indices(z))[clear], ref_idx[clear])
  dec = jax.jit(lambda v, i: model.apply(v, i, (4, 3), method="decode_code"))({"params": loaded}, jnp.asarray(ref_idx))
  np.testing.assert_allclose(_nchw(dec), _np_decode_code(sd64, kw["decoder"], ref_idx, (4, 3)), atol=1e-4, rtol=0)
  out = cm.export_magvit(str(tmp_path / "ck"), str(tmp_path / "out"))
  assert open(out, "rb").read() == src.read_bytes()


def test_indices_codes_round_trip_and_bit_order():
  bits = 4
  z = jnp.asarray([[[[0.5, -1.0, 0.0, 2.0]]]])  # channel 0 is the most significant bit; exact 0 -> bit 0
  assert int(mv.codes_to_indices(z)[0, 0]) == 0b1001
  idx = jnp.arange(16, dtype=jnp.int32).reshape(1, 16)
  codes = mv.indices_to_codes(idx, bits, (2, 8))
  np.testing.assert_array_equal(np.asarray(codes).reshape(16, bits), mv.codebook_embedding(bits))
  np.testing.assert_array_equal(mv.codes_to_indices(codes), idx)  # raster order y * w + x
  with pytest.raises(ValueError, match="not a square"):
    mv.indices_to_codes(jnp.zeros((1, 8), jnp.int32), bits)
