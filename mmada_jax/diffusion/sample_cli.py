"""`mmada-jax sample`: generate from a checkpoint at the terminal, or time the text sampler.

  mmada-jax sample text  --config FILE (--params CKPT | --workdir DIR) --prompt TEXT [--prompt TEXT ...] [--think]
  mmada-jax sample t2i   --config FILE (--params CKPT | --workdir DIR) [--magvit CKPT] --prompt TEXT [--num_images K]
                         [--out DIR]
  mmada-jax sample mmu   --config FILE (--params CKPT | --workdir DIR) [--magvit CKPT] --image FILE --question TEXT
  mmada-jax sample bench --config FILE [--batch 1,8] [--prompt_len 64] [--gen_length 64] [--block_length 32]
                         [--steps 32] [--variants exact,dual_cache,threshold=0.9] [--repeats 3]

Weights: `--params` is an mmada-jax parameter checkpoint (`mmada-jax convert` of the official weights, or any
`checkpoint.save_params` tree of the backbone); `--workdir` is a training run, whose latest `checkpoints/<step>/state`
(or `--step N`) is read for its parameters only. The MAGVIT-v2 tokenizer (t2i, mmu) is `--magvit` or
`data.image_tokenizer`; its architecture must match the `magvit` config section.

Sampler settings: the config's `sampling.text` (text, mmu) or `sampling.image` (t2i) section, then `--preset NAME`
(the official demo settings, listed by `--help` of each mode), then explicit `--config.sampling.*` overrides and the sampler flags.

`text` prints the answer block by block as it is generated (one prompt; several prompts are generated as one batch and
printed at the end); `--think` adds the official CoT instruction. `t2i` writes one PNG per image (never over an
existing file). `mmu` encodes the image with MAGVIT and answers the question in the training prompt format (`--format
chat` for the chat template of the official demo).

`bench` (the shared bench workload by default: prompt 64 random tokens, 64 generated, block 32, 32 steps, temperature
0, low-confidence remasking; random weights): one warm-up call, then the median of `--repeats` timed calls. Variants:
`exact` (identical tokens to the official sampler), `dual_cache`, `threshold=P` and combinations joined with `+`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from mmada_jax import config as config_lib

# Official demo settings (specs/mmada-official.md §5, §6.1: the Gradio demo, inference scripts, evaluation command).
TEXT_PRESETS = {
    # Gradio demo defaults for text and image understanding (first example).
    "demo": dict(gen_length=512, block_length=128, steps=256, temperature=1.0, cfg_scale=0.0,
                 remasking="low_confidence"),
    # The demo's second text example: blocks of 64.
    "demo-block64": dict(gen_length=512, block_length=64, steps=256, temperature=1.0, cfg_scale=0.0,
                         remasking="low_confidence"),
    # inference_mmu.py and the training-time validation: G = 512, S/2 steps, S/4 blocks, greedy.
    "mmu": dict(gen_length=512, block_length=128, steps=256, temperature=0.0, cfg_scale=0.0,
                remasking="low_confidence"),
    # The lm-eval GSM8K command of the official evaluation: G 256, 256 steps, blocks of 64, greedy.
    "gsm8k": dict(gen_length=256, block_length=64, steps=256, temperature=0.0, cfg_scale=0.0,
                  remasking="low_confidence"),
}
IMAGE_PRESETS = {
    # inference_t2i.py README command and the Gradio demo: 15 steps, guidance 3.5, T0 = 1, cosine.
    "demo": dict(timesteps=15, guidance_scale=3.5, temperature=1.0, noise_schedule="cosine",
                 temperature_annealing="cumulative"),
    # The same with 50 steps.
    "demo-50": dict(timesteps=50, guidance_scale=3.5, temperature=1.0, noise_schedule="cosine",
                    temperature_annealing="cumulative"),
}
MMU_FORMATS = ("train", "chat")


class SampleError(ValueError):
  """Bad input to the samplers: a missing file, an unknown preset, a checkpoint that does not fit the config."""


# ----------------------------------------------------------------------------------------------------------------------
# Sampler settings


def _explicit(overrides: dict[str, str], section: str) -> set[str]:
  prefix = f"sampling.{section}."
  return {k[len(prefix):] for k in overrides if k.startswith(prefix)}


def _merged(section, presets: dict, kind: str, preset: str | None, explicit: set[str], flags: dict) -> dict:
  """The config section's values, then the preset's (except the `explicit` keys), then the non-None `flags`."""
  values = dict(section)
  if preset:
    if preset not in presets:
      raise SampleError(f"--preset {preset!r}: unknown {kind} preset (known: {', '.join(presets)})")
    values.update({k: v for k, v in presets[preset].items() if k not in explicit})
  values.update({k: v for k, v in flags.items() if v is not None})
  return values


def text_settings(config, preset: str | None = None, explicit: set[str] = frozenset(), **flags) -> Any:
  """`TextSampling` from `config.sampling.text`, then `TEXT_PRESETS[preset]` (except the keys in `explicit`, which
  came from `--config.sampling.text.*`), then the non-None `flags`."""
  from mmada_jax.diffusion import sampling_text as st

  values = _merged(config.sampling.text, TEXT_PRESETS, "text", preset, explicit, flags)
  try:
    return st.TextSampling.from_config(values, eot_id=int(config.vocab.eot_id))
  except ValueError as e:
    raise SampleError(f"text sampler settings: {e}") from None


def image_settings(config, preset: str | None = None, explicit: set[str] = frozenset(), **flags) -> Any:
  """`ImageSampling` from `config.sampling.image`, then `IMAGE_PRESETS[preset]`, then the non-None `flags`."""
  from mmada_jax.diffusion import sampling_image as si

  values = _merged(config.sampling.image, IMAGE_PRESETS, "image", preset, explicit, flags)
  try:
    return si.ImageSampling.from_config(values)
  except ValueError as e:
    raise SampleError(f"image sampler settings: {e}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in flat}


def _check_tree(saved: Any, expected: Any, where: str, config) -> None:
  """Raises CheckpointError naming missing / unexpected parameters and shape differences (`saved` vs the model)."""
  from mmada_jax import checkpoint as ckpt

  have, want = _flat_shapes(saved), _flat_shapes(expected)
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  shapes = [f"{k}: checkpoint {have[k][0]}, model {want[k][0]}" for k in sorted(set(have) & set(want))
            if have[k][0] != want[k][0]]
  if not (missing or extra or shapes):
    return
  lines = []
  if missing:
    lines.append(f"missing in the checkpoint ({len(missing)}): {', '.join(missing[:6])}")
  if extra:
    lines.append(f"not in the model ({len(extra)}): {', '.join(extra[:6])}")
  lines += shapes[:8]
  stacked = any(k.startswith("blocks/") for k in have)
  hint = (f"the checkpoint has {'stacked' if stacked else 'unstacked'} layers: set "
          f"--config.model.scan_layers={stacked}") if stacked != bool(config.model.scan_layers) else \
      "check the model section of the config (num_layers, d_model, heads, mlp_hidden, vocab_size)"
  raise ckpt.CheckpointError(f"{where} does not fit the config's model:\n  " + "\n  ".join(lines) + f"\n  ({hint})")


def _saved_tree(item_dir: str) -> Any:
  import orbax.checkpoint as ocp
  from etils import epath

  return ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir)).tree


def training_steps(workdir: str) -> list[int]:
  """Finished checkpoint steps of a training run (`WORKDIR/checkpoints/<step>/state`), ascending."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return []
  return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n, "state")))


def _restore_workdir_params(workdir: str, step: int | None, expected: Any, config) -> tuple[Any, str, int]:
  """(host parameters, state directory, step) of a training checkpoint, checked against the model's `expected`
  parameter shapes before anything is read; the optimizer state is never read."""
  import orbax.checkpoint as ocp

  from mmada_jax import checkpoint as ckpt

  if not os.path.isdir(workdir):
    raise ckpt.CheckpointError(f"--workdir {workdir}: no such directory")
  steps = training_steps(workdir)
  if not steps:
    raise ckpt.CheckpointError(f"--workdir {workdir}: no training checkpoint (expected "
                               f"{os.path.join(workdir, 'checkpoints', '<step>', 'state')})")
  if step is not None and step not in steps:
    raise ckpt.CheckpointError(f"--workdir {workdir}: no checkpoint at step {step} (available: {steps})")
  step = steps[-1] if step is None else step
  item = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "state"))
  tree = _saved_tree(item)
  if not isinstance(tree, dict) or "params" not in tree:
    raise ckpt.CheckpointError(f"{item}: not a train state (no 'params' entry)")
  _check_tree(tree["params"], expected, item, config)
  args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
  out = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
      item={"params": tree["params"]}, restore_args={"params": args}, partial_restore=True))
  return out["params"], item, step


def load_backbone(config, *, params: str | None = None, workdir: str | None = None, step: int | None = None,
                  log: Callable[[str], None] = print) -> tuple[Any, Any, dict]:
  """(model, device parameters in `model.param_dtype`, {"source": path, "step": training step or None}) from exactly
  one of `params` (a parameter checkpoint) or `workdir` (a training run)."""
  import flax.linen as nn

  from mmada_jax.models import llada
  from mmada_jax.parallel import partitioning

  if (params is None) == (workdir is None):
    raise SampleError("give the model weights with exactly one of --params CKPT or --workdir DIR")
  if step is not None and workdir is None:
    raise SampleError("--step selects a checkpoint of --workdir; it does not apply to --params")
  model = llada.build_model(config.model)
  expected = nn.unbox(partitioning.abstract_variables(model)["params"])
  host, info = read_backbone(config, expected, params=params, workdir=workdir, step=step)
  device = jax.tree.map(lambda h, e: jax.device_put(np.asarray(h).astype(e.dtype)), host, expected)
  log(f"parameters: {info['source']}" + ("" if info["step"] is None else f" (step {info['step']})"))
  return model, device, info


def read_backbone(config, expected: Any, *, params: str | None = None, workdir: str | None = None,
                  step: int | None = None) -> tuple[Any, dict]:
  """(host parameters as saved, {"source", "step"}) from `params` or `workdir`, checked against `expected` shapes."""
  from mmada_jax import checkpoint as ckpt

  if params is not None:
    meta = ckpt.read_metadata(params)
    if meta.get("kind", "mmada_backbone") != "mmada_backbone":
      raise ckpt.CheckpointError(f"--params {params}: a {meta.get('kind')!r} checkpoint, not backbone parameters"
                                 + (" (pass it as --magvit)" if meta.get("kind") == "magvit" else ""))
    _check_tree(_saved_tree(os.path.join(os.path.abspath(params), "params")), expected, params, config)
    host, _ = ckpt.load_params(params, as_numpy=True)
    source = os.path.abspath(params)
  else:
    host, source, step = _restore_workdir_params(workdir, step, expected, config)
  return host, {"source": source, "step": step}


@dataclasses.dataclass
class ImageTokenizer:
  """The MAGVIT-v2 tokenizer of a sampler: uint8 pixels <-> codes (jitted encode / decode)."""
  model: Any
  params: Any
  resolution: int
  resize_mode: str

  def encode(self, images: Sequence[Any]) -> np.ndarray:
    """Images (paths, PIL images or uint8 [H, W, 3] arrays, resized / cropped to the tokenizer's resolution as
    the official transform does) -> int32 codes [B, N]."""
    from mmada_jax.models import image_io

    try:
      x = image_io.load_images(images, self.resolution, self.resize_mode)
    except FileNotFoundError as e:
      raise SampleError(str(e)) from None
    except OSError as e:  # PIL: not an image, truncated file
      raise SampleError(f"cannot read image: {e}") from None
    return np.asarray(_magvit_encode(self.model, self.params, x)).astype(np.int32)

  def decode(self, codes: np.ndarray) -> np.ndarray:
    """Codes [B, N] -> uint8 images [B, H, W, 3] (official clamp-scale-truncate)."""
    from mmada_jax.models import image_io

    return image_io.to_uint8(np.asarray(_magvit_decode(self.model, self.params, np.asarray(codes, np.int32))))


@functools.partial(jax.jit, static_argnums=0)
def _magvit_encode(model, params, x):
  from mmada_jax.models import magvit

  return model.apply({"params": params}, x, method=magvit.MagvitV2.get_code)


@functools.partial(jax.jit, static_argnums=0)
def _magvit_decode(model, params, codes):
  from mmada_jax.models import magvit

  return model.apply({"params": params}, codes, method=magvit.MagvitV2.decode_code)


def load_image_tokenizer(config, path: str | None, log: Callable[[str], None] = print) -> ImageTokenizer:
  """The MAGVIT-v2 checkpoint at `path` (default `data.image_tokenizer`), checked against the config's `magvit`
  section and vocabulary (codebook size, image tokens per image)."""
  from mmada_jax import checkpoint as ckpt
  from mmada_jax.convert import magvit as magvit_convert
  from mmada_jax.models import magvit

  path = path or config.data.image_tokenizer
  if not path:
    raise SampleError("no image tokenizer: pass --magvit CKPT or --config.data.image_tokenizer=CKPT (a MAGVIT-v2 "
                      "parameter checkpoint)")
  params, cfg = magvit_convert.load_magvit(path, config.magvit)
  if cfg.codebook_size != config.vocab.codebook_size:
    raise ckpt.CheckpointError(f"{path}: {cfg.codebook_size} codes, but vocab.codebook_size="
                               f"{config.vocab.codebook_size}")
  tokens = (cfg.resolution // cfg.downsample_factor) ** 2
  if tokens != config.vocab.num_image_tokens:
    raise ckpt.CheckpointError(f"{path}: {cfg.resolution} px images give {tokens} codes, but "
                               f"vocab.num_image_tokens={config.vocab.num_image_tokens}")
  log(f"image tokenizer: {os.path.abspath(path)}")
  return ImageTokenizer(magvit.MagvitV2(cfg), jax.device_put(params), int(cfg.resolution),
                        str(config.magvit.resize_mode))


# ----------------------------------------------------------------------------------------------------------------------
# Generation


def stream_text(model, params, prompt, prompt_mask=None, *, mask_id: int, settings, rng=None) -> Iterator[tuple]:
  """`sampling_text.generate` one block at a time: yields (block index, tokens [B, P + G] np.int32) after every block.

  The tokens are those of `generate` with the same arguments: the state (sequence, call counter for the noise keys,
  early stop) is carried between the per-block programs exactly as the single program carries it.
  """
  import jax.numpy as jnp

  s = dataclasses.replace(settings, trace=False)
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2:
    raise ValueError(f"prompt must be [batch, prompt_len], got shape {prompt.shape}")
  if rng is None:
    if s.stochastic:
      raise ValueError("rng is required when temperature > 0 or remasking='random'")
    rng = jax.random.key(0)
  batch, prompt_len = prompt.shape
  x = np.concatenate([prompt, np.full((batch, s.gen_length), mask_id, np.int32)], axis=1)
  pad = None
  if prompt_mask is not None:
    pad = jnp.asarray(np.concatenate([np.asarray(prompt_mask, bool), np.ones((batch, s.gen_length), bool)], axis=1))
  state = {"x": jnp.asarray(x), "block": jnp.int32(0), "calls": jnp.int32(0)}
  if s.dual_cache:
    a = model.args
    shape = (a.num_layers, batch * (2 if s.cfg_scale > 0 else 1), x.shape[1], a.num_kv_heads, a.head_dim)
    state["cache"] = (jnp.zeros(shape, a.dtype), jnp.zeros(shape, a.dtype))
  prompt_index = jnp.asarray(x != mask_id)
  for b in range(s.num_blocks):
    tokens = np.asarray(state["x"])
    if s.stop_token is not None and b > 0 and np.all(tokens[:, prompt_len + b * s.block_length - 1] == s.stop_token):
      return
    state = _one_block(model, params, state, prompt_index, pad, rng, settings=s, mask_id=int(mask_id),
                       prompt_len=prompt_len)
    yield b, np.asarray(state["x"])


@functools.partial(jax.jit, static_argnames=("model", "settings", "mask_id", "prompt_len"))
def _one_block(model, params, state, prompt_index, pad, key, *, settings, mask_id, prompt_len):
  from mmada_jax.diffusion import sampling_text as st

  # The loop body of `sampling_text._generate`, one block per call (pylint: disable=protected-access).
  fwd = st._Forward(model, params, settings, mask_id, key, prompt_index=prompt_index, pad=pad)
  return st._block(fwd, state, prompt_len)


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(config) -> Any:
  """`data_setup.make_tokenizer`, kept per configuration: the ToyWorld tokenizer is trained on the fly (~1 s), and
  one process may load several samplers (tests, notebooks)."""
  from mmada_jax.train import data_setup

  d = config.data
  key = repr((d.tokenizer_dir, sorted(dict(config.vocab).items()), sorted(dict(d.toyworld).items()), config.seed))
  if key not in _TOKENIZERS:
    _TOKENIZERS[key] = data_setup.make_tokenizer(config)
  return _TOKENIZERS[key]


@dataclasses.dataclass
class Sampler:
  """A backbone with its tokenizer, vocabulary and layouts (and the image tokenizer when images are involved)."""
  config: Any
  model: Any
  params: Any
  tokenizer: Any
  vocab: Any
  prompter: Any
  images: ImageTokenizer | None = None
  origin: dict = dataclasses.field(default_factory=dict)  # {"source": checkpoint path, "step": training step}

  @classmethod
  def load(cls, config, *, params: str | None = None, workdir: str | None = None, step: int | None = None,
           magvit: str | None = None, need_images: bool = False, log: Callable[[str], None] = print) -> "Sampler":
    from mmada_jax.tokens import prompting, vocab as vocab_lib

    images = load_image_tokenizer(config, magvit, log) if need_images else None
    model, device_params, origin = load_backbone(config, params=params, workdir=workdir, step=step, log=log)
    return cls(config, model, device_params, _tokenizer(config),
               vocab_lib.Vocab.from_config(config.vocab), prompting.Prompter.from_config(config), images, origin)

  # ---- prompts -----------------------------------------------------------------------------------------------------

  def chat_prompt(self, prompt: str, think: bool = False, chat: bool = True) -> list[int]:
    """BOS + the official chat template with the assistant header open (`chat`), or BOS + the raw text."""
    from mmada_jax.tokens import text_tokenizer as tt

    content = tt.COT_SYSTEM_PROMPT + prompt if think else prompt
    text = tt.chat_text([{"role": "user", "content": content}], self.vocab, add_generation_prompt=True) if chat \
        else prompt
    return [self.vocab.bos_id] + self.tokenizer.encode(text)

  def mmu_prompt(self, codes: np.ndarray, question: str, think: bool = False, fmt: str = "train") -> list[int]:
    """`<|mmu|> <|soi|> image <|eoi|> BOS text` (§3.6): `train` = the training format (`mmu_text`, with the literal
    end-of-turn of `data.mmu_literal_eot`), `chat` = the chat template of the official demo."""
    from mmada_jax.tokens import text_tokenizer as tt

    if fmt not in MMU_FORMATS:
      raise SampleError(f"mmu prompt format must be one of {MMU_FORMATS}, got {fmt!r}")
    if fmt == "train":
      text = tt.mmu_text(question, "", self.vocab, literal_eot=bool(self.config.data.mmu_literal_eot), cot=think)
    else:
      content = tt.COT_SYSTEM_PROMPT + question if think else question
      text = tt.chat_text([{"role": "user", "content": content}], self.vocab, add_generation_prompt=True)
    return self.prompter.mmu_gen(codes, self.tokenizer.encode(text))["input_ids"].tolist()

  def answer(self, ids: Sequence[int]) -> str:
    """Generated ids [G] -> text up to the end of the answer (first EOS or `<|eot_id|>`; training pads answers with
    EOS), without [MASK] (blocks never generated after an early stop) and other special tokens."""
    v, out = self.vocab, []
    for i in np.asarray(ids).tolist():
      if i in (v.eos_id, v.eot_id):
        break
      if i != v.mask_id:
        out.append(i)
    return self.tokenizer.decode(out, skip_special_tokens=True)

  # ---- samplers ----------------------------------------------------------------------------------------------------

  def generate_text(self, prompts: Sequence[Sequence[int]], settings, rng=None, *, width: int | None = None,
                    force_mask: bool = False, on_block: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Answers [B, G] int32 for prompts of any lengths (left-padded to the longest, or to `width`).

    `force_mask` passes the padding mask even when nothing is padded (one compiled program for every batch);
    `on_block(block, answers [B, G])` is called after every block.
    """
    from mmada_jax.diffusion import sampling_text as st

    ids, mask = st.left_pad(list(prompts), self.vocab.pad_id)
    if width is not None and width > ids.shape[1]:
      extra = width - ids.shape[1]
      ids = np.concatenate([np.full((len(ids), extra), self.vocab.pad_id, np.int32), ids], axis=1)
      mask = np.concatenate([np.zeros((len(ids), extra), np.int32), mask], axis=1)
    mask = mask if force_mask or not mask.all() else None
    p = ids.shape[1]
    if on_block is None:
      out = st.generate(self.model, self.params, ids, mask, mask_id=self.vocab.mask_id, settings=settings, rng=rng)
      return np.asarray(out["tokens"])[:, p:]
    tokens = np.concatenate([ids, np.full((len(ids), settings.gen_length), self.vocab.mask_id, np.int32)], axis=1)
    for b, tokens in stream_text(self.model, self.params, ids, mask, mask_id=self.vocab.mask_id, settings=settings,
                                 rng=rng):
      on_block(b, tokens[:, p:])
    return tokens[:, p:]

  def generate_images(self, prompts: Sequence[str], settings, rng) -> tuple[np.ndarray, np.ndarray]:
    """Text-to-image: (codes [B, N] int32, uint8 images [B, H, W, 3]) for B prompts."""
    from mmada_jax.diffusion import sampling_image as si
    from mmada_jax.tokens import prompting

    if self.images is None:
      raise SampleError("text-to-image needs the image tokenizer (Sampler.load(..., need_images=True))")
    layouts = prompting.stack([self.prompter.t2i_gen(self.tokenizer.encode(p)) for p in prompts])
    un_ids, un_mask = si.null_prompt(self.prompter, len(prompts)) if settings.guidance_scale > 0 else (None, None)
    out = si.t2i_generate(self.model, self.params, layouts["input_ids"], layouts["valid_mask"], un_ids, un_mask,
                          **si.image_vocab_args(self.vocab), settings=settings, rng=rng)
    codes = np.clip(np.asarray(out["codes"]), 0, self.vocab.codebook_size - 1)
    return codes, self.images.decode(codes)

  def text_prefix_overflow(self, prompt: str) -> int:
    """How many tokens of a t2i prompt do not fit the S text positions of the layout (they are cut)."""
    return max(0, len(self.tokenizer.encode(prompt)) + 3 - (self.prompter.max_text_len + 1))


# ----------------------------------------------------------------------------------------------------------------------
# Modes


def _key(seed: int):
  return jax.random.key(int(seed))


def run_text(sampler: Sampler, prompts: list[str], settings, seed: int, think: bool = False, chat: bool = True,
             out=None) -> list[str]:
  """Generates and prints the answers (to `out`, default stdout); one prompt is printed block by block."""
  out = out or sys.stdout
  ids = [sampler.chat_prompt(p, think=think, chat=chat) for p in prompts]
  shown = [""]

  def show(block: int, answers: np.ndarray) -> None:
    # Held back: a character whose bytes are split across blocks, until the next block completes it.
    text = sampler.answer(answers[0, :(block + 1) * settings.block_length]).rstrip("\ufffd")
    if text.startswith(shown[0]):  # else a [MASK] the model wrote earlier was filled in: the end prints the answer
      out.write(text[len(shown[0]):])
      out.flush()
      shown[0] = text

  t0 = time.perf_counter()
  answers = sampler.generate_text(ids, settings, _key(seed), on_block=show if len(prompts) == 1 else None)
  texts = [sampler.answer(a) for a in answers]
  if len(prompts) == 1:
    rest = texts[0][len(shown[0]):] if texts[0].startswith(shown[0]) else f"\n[final] {texts[0]}"
    out.write(rest + "\n")
  else:
    for i, text in enumerate(texts):
      out.write(f"[{i}] {prompts[i]}\n{text}\n\n")
  out.write(f"({len(prompts)} x {settings.gen_length} positions in {time.perf_counter() - t0:.1f} s)\n")
  out.flush()
  return texts


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "image"


def _free_path(directory: str, stem: str) -> str:
  """`directory/stem.png`, or `stem-1.png`, `stem-2.png`, ... when it exists (nothing is overwritten)."""
  path, k = os.path.join(directory, f"{stem}.png"), 0
  while os.path.exists(path):
    k += 1
    path = os.path.join(directory, f"{stem}-{k}.png")
  return path


def run_t2i(sampler: Sampler, prompts: list[str], settings, seed: int, num_images: int, out_dir: str,
            log: Callable[[str], None] = print) -> list[str]:
  """Generates `num_images` images per prompt (one batch) and writes each as a PNG; returns the paths."""
  from mmada_jax.models import image_io

  for p in prompts:
    if (cut := sampler.text_prefix_overflow(p)) > 0:
      log(f"warning: the last {cut} token(s) of {p!r} do not fit data.max_text_len={sampler.prompter.max_text_len} "
          f"and are cut")
  batch = [p for p in prompts for _ in range(num_images)]
  t0 = time.perf_counter()
  _, images = sampler.generate_images(batch, settings, _key(seed))
  log(f"{len(batch)} image(s), {settings.timesteps} steps, guidance {settings.guidance_scale} in "
      f"{time.perf_counter() - t0:.1f} s")
  paths = []
  for i, (prompt, image) in enumerate(zip(batch, images)):
    paths.append(image_io.save_png(image, _free_path(out_dir, f"{i:02d}_{_slug(prompt)}")))
    log(f"wrote {paths[-1]}")
  return paths


def run_mmu(sampler: Sampler, image: str, questions: list[str], settings, seed: int, think: bool = False,
            fmt: str = "train", out=None) -> list[str]:
  """Answers each question about one image file; prints question and answer (to `out`, default stdout)."""
  out = out or sys.stdout
  if not os.path.isfile(image):
    raise SampleError(f"--image {image}: no such file")
  codes = sampler.images.encode([image])[0]
  ids = [sampler.mmu_prompt(codes, q, think=think, fmt=fmt) for q in questions]
  answers = [sampler.answer(a) for a in sampler.generate_text(ids, settings, _key(seed))]
  for q, a in zip(questions, answers):
    out.write(f"Q: {q}\nA: {a}\n")
  out.flush()
  return answers


# ----------------------------------------------------------------------------------------------------------------------
# Bench


def _run_bench(config, args) -> int:
  """`sample bench`: the text-generation workload of `mmada-jax bench generate` (mmada_jax/bench/workloads.py)."""
  from mmada_jax.bench import workloads

  try:
    variants = workloads.generate_variants(argparse.Namespace(**vars(args), dual_cache=False, threshold=None))
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  workloads.bench_text(config, workloads.parse_batches(args.batch), variants, args)
  return 0


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def _weights_args(p: argparse.ArgumentParser, images: bool) -> None:
  p.add_argument("--params", help="mmada-jax parameter checkpoint of the backbone (e.g. converted official weights)")
  p.add_argument("--workdir", help="training run directory: parameters of its latest checkpoint")
  p.add_argument("--step", type=int, help="with --workdir: this checkpoint step instead of the latest")
  p.add_argument("--seed", type=int, help="PRNG seed of the sampler noise (default: config seed)")
  if images:
    p.add_argument("--magvit", help="MAGVIT-v2 parameter checkpoint (default: data.image_tokenizer)")


def _text_flags(p: argparse.ArgumentParser, presets: dict) -> None:
  p.add_argument("--preset", help=f"official demo settings: {', '.join(presets)}")
  p.add_argument("--gen_length", type=int, help="generated positions G (sampling.text.gen_length)")
  p.add_argument("--block_length", type=int, help="positions per block (sampling.text.block_length)")
  p.add_argument("--steps", type=int, help="model calls in total (sampling.text.steps)")
  p.add_argument("--temperature", type=float, help="Gumbel temperature (sampling.text.temperature)")
  p.add_argument("--think", action="store_true", help="prepend the official CoT instruction (<think> reasoning)")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mmada-jax sample", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  modes = parser.add_subparsers(dest="mode", required=True)
  text = modes.add_parser("text", help="prompt -> answer, streamed block by block")
  _weights_args(text, images=False)
  _text_flags(text, TEXT_PRESETS)
  text.add_argument("--prompt", action="append", required=True, help="user message (repeat for a batch)")
  text.add_argument("--raw", action="store_true", help="no chat template: BOS + the prompt text (base models)")
  t2i = modes.add_parser("t2i", help="prompt -> PNG image(s)")
  _weights_args(t2i, images=True)
  t2i.add_argument("--preset", help=f"official demo settings: {', '.join(IMAGE_PRESETS)}")
  t2i.add_argument("--prompt", action="append", required=True, help="image description (repeat for several)")
  t2i.add_argument("--timesteps", type=int, help="MaskGIT steps (sampling.image.timesteps)")
  t2i.add_argument("--guidance_scale", type=float, help="classifier-free guidance g (sampling.image.guidance_scale)")
  t2i.add_argument("--num_images", type=int, default=1, help="images per prompt")
  t2i.add_argument("--out", default="samples", help="directory of the PNG files (default: ./samples)")
  mmu = modes.add_parser("mmu", help="image + question -> answer")
  _weights_args(mmu, images=True)
  _text_flags(mmu, TEXT_PRESETS)
  mmu.add_argument("--image", required=True, help="image file (any size; resized and centre-cropped)")
  mmu.add_argument("--question", action="append", required=True, help="question (repeat for several)")
  mmu.add_argument("--format", choices=MMU_FORMATS, default="train",
                   help="prompt text: the training format (default) or the chat template of the official demo")
  bench = modes.add_parser("bench", help="text sampler speed on random weights")
  bench.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
  bench.add_argument("--prompt_len", type=int, default=64)
  bench.add_argument("--gen_length", type=int, default=64)
  bench.add_argument("--block_length", type=int, default=32)
  bench.add_argument("--steps", type=int, default=32)
  bench.add_argument("--variants", default="exact", help="comma-separated: exact, dual_cache, threshold=P, a+b")
  bench.add_argument("--repeats", type=int, default=3)
  return parser


def main_sample(argv: list[str]) -> int:
  """Entry point of `mmada-jax sample`; returns the exit status."""
  path, overrides, rest = config_lib.split_config_args(argv)
  args = _parser().parse_args(rest)
  if path is None:
    raise config_lib.ConfigError("--config FILE is required (the experiment file the weights were made for)")
  config = config_lib.load_config(path, overrides)
  if args.mode == "bench":
    return _run_bench(config, args)
  seed = config.seed if args.seed is None else args.seed
  if args.mode == "t2i":
    settings = image_settings(config, args.preset, _explicit(overrides, "image"), timesteps=args.timesteps,
                              guidance_scale=args.guidance_scale)
    if args.num_images < 1:
      raise SampleError(f"--num_images must be >= 1, got {args.num_images}")
  else:
    settings = text_settings(config, args.preset, _explicit(overrides, "text"), gen_length=args.gen_length,
                             block_length=args.block_length, steps=args.steps, temperature=args.temperature)
  if args.mode == "mmu" and not os.path.isfile(args.image):
    raise SampleError(f"--image {args.image}: no such file")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  sampler = Sampler.load(config, params=args.params, workdir=args.workdir, step=args.step,
                         magvit=getattr(args, "magvit", None), need_images=args.mode != "text", log=log)
  if args.mode == "text":
    run_text(sampler, args.prompt, settings, seed, think=args.think, chat=not args.raw)
  elif args.mode == "t2i":
    run_t2i(sampler, args.prompt, settings, seed, args.num_images, args.out, log=log)
  else:
    run_mmu(sampler, args.image, args.question, settings, seed, think=args.think, fmt=args.format)
  return 0


if __name__ == "__main__":
  sys.exit(main_sample(sys.argv[1:]))
