"""Sampler settings: a config's `sampling.text` / `sampling.image` section, the official demo presets on top, then
explicit values (command-line flags, `--config.sampling.*` overrides).

The presets are the settings of the official demo, inference scripts and evaluation command (specs/mmada-official.md
§5, §6.1).
"""

from __future__ import annotations

from typing import Any, Mapping

from mmada_jax.diffusion import sampling_image as si, sampling_text as st
from mmada_jax.inference.errors import InferenceError

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


def explicit_keys(overrides: Mapping[str, str], section: str) -> set[str]:
  """The keys of `sampling.<section>` that `--config.sampling.<section>.KEY=V` overrides set (a preset keeps them)."""
  prefix = f"sampling.{section}."
  return {k[len(prefix):] for k in overrides if k.startswith(prefix)}


def _merged(section, presets: dict, kind: str, preset: str | None, explicit: set[str], flags: dict) -> dict:
  """The config section's values, then the preset's (except the `explicit` keys), then the non-None `flags`."""
  values = dict(section)
  if preset:
    if preset not in presets:
      raise InferenceError(f"--preset {preset!r}: unknown {kind} preset (known: {', '.join(presets)})")
    values.update({k: v for k, v in presets[preset].items() if k not in explicit})
  values.update({k: v for k, v in flags.items() if v is not None})
  return values


def text_settings(config, preset: str | None = None, explicit: set[str] = frozenset(), **flags: Any
                  ) -> st.TextSampling:
  """`TextSampling` from `config.sampling.text`, then `TEXT_PRESETS[preset]` (except the keys in `explicit`, which
  came from `--config.sampling.text.*`), then the non-None `flags`."""
  values = _merged(config.sampling.text, TEXT_PRESETS, "text", preset, explicit, flags)
  try:
    return st.TextSampling.from_config(values, eot_id=int(config.vocab.eot_id))
  except ValueError as e:
    raise InferenceError(f"text sampler settings: {e}") from None


def image_settings(config, preset: str | None = None, explicit: set[str] = frozenset(), **flags: Any
                   ) -> si.ImageSampling:
  """`ImageSampling` from `config.sampling.image`, then `IMAGE_PRESETS[preset]`, then the non-None `flags`."""
  values = _merged(config.sampling.image, IMAGE_PRESETS, "image", preset, explicit, flags)
  try:
    return si.ImageSampling.from_config(values)
  except ValueError as e:
    raise InferenceError(f"image sampler settings: {e}") from None
