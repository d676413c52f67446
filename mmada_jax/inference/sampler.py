"""The `Sampler`: a backbone with its tokenizers, vocabulary and sequence layouts, and the three generation tasks of
MMaDA: text answers (semi-autoregressive masked diffusion), image understanding (an image in the prompt, a text
answer) and text-to-image (MaskGIT with classifier-free guidance).

  sampler = Sampler.load(config, workdir="runs/toyworld/cot", need_images=True)
  ids = [sampler.chat_prompt("What is 2 + 3?")]
  answers = sampler.generate_text(ids, presets.text_settings(config), jax.random.key(0))
  print(sampler.answer(answers[0]))

The sampler algorithms themselves are `diffusion.sampling_text` and `diffusion.sampling_image`; settings and the
official presets are `inference.presets`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from mmada_jax.data.tokenizer import shared_tokenizer
from mmada_jax.diffusion import sampling_image as si, sampling_text as st
from mmada_jax.inference.errors import InferenceError
from mmada_jax.inference.image_tokenizer import ImageTokenizer, load_image_tokenizer
from mmada_jax.inference.loading import Params, load_backbone
from mmada_jax.models import llada
from mmada_jax.tokens import prompting, text_tokenizer as tt, vocab as vocab_lib

MMU_FORMATS = ("train", "chat")


@dataclasses.dataclass
class Sampler:
  """A backbone with its tokenizer, vocabulary and layouts (and the image tokenizer when images are involved)."""
  config: Any  # the experiment's ml_collections.ConfigDict
  model: llada.Transformer
  params: Params
  tokenizer: tt.TextTokenizer
  vocab: vocab_lib.Vocab
  prompter: prompting.Prompter
  images: ImageTokenizer | None = None
  origin: dict = dataclasses.field(default_factory=dict)  # {"source": checkpoint path, "step": training step}

  @classmethod
  def load(cls, config, *, params: str | None = None, workdir: str | None = None, step: int | None = None,
           magvit: str | None = None, need_images: bool = False, log: Callable[[str], None] = print) -> "Sampler":
    """From a parameter checkpoint (`params`) or a training run (`workdir`, its latest or `step` checkpoint); with
    `need_images`, also the image tokenizer (`magvit`, default `data.image_tokenizer`)."""
    images = load_image_tokenizer(config, magvit, log) if need_images else None
    model, device_params, origin = load_backbone(config, params=params, workdir=workdir, step=step, log=log)
    return cls.from_parts(config, model, device_params, images=images, origin=origin)

  @classmethod
  def from_parts(cls, config, model: llada.Transformer, params: Params, *, images: ImageTokenizer | None = None,
                 origin: dict | None = None, tokenizer: tt.TextTokenizer | None = None) -> "Sampler":
    """From a model and parameters already in memory (e.g. the training loop's); the text tokenizer, vocabulary and
    layouts come from `config`."""
    return cls(config, model, params, tokenizer or shared_tokenizer(config), vocab_lib.Vocab.from_config(config.vocab),
               prompting.Prompter.from_config(config), images, dict(origin or {}))

  # ---- prompts -----------------------------------------------------------------------------------------------------

  def chat_prompt(self, prompt: str, think: bool = False, chat: bool = True) -> list[int]:
    """BOS + the official chat template with the assistant header open (`chat`), or BOS + the raw text."""
    content = tt.COT_SYSTEM_PROMPT + prompt if think else prompt
    text = tt.chat_text([{"role": "user", "content": content}], self.vocab, add_generation_prompt=True) if chat \
        else prompt
    return [self.vocab.bos_id] + self.tokenizer.encode(text)

  def mmu_prompt(self, codes: np.ndarray, question: str, think: bool = False, fmt: str = "train") -> list[int]:
    """`<|mmu|> <|soi|> image <|eoi|> BOS text` (§3.6): `train` = the training format (`mmu_text`, with the literal
    end-of-turn of `data.mmu_literal_eot`), `chat` = the chat template of the official demo."""
    if fmt not in MMU_FORMATS:
      raise InferenceError(f"mmu prompt format must be one of {MMU_FORMATS}, got {fmt!r}")
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

  def generate_text(self, prompts: Sequence[Sequence[int]], settings: st.TextSampling, rng: jax.Array | None = None,
                    *, width: int | None = None, force_mask: bool = False,
                    on_block: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Answers [B, G] int32 for prompts of any lengths (left-padded to the longest, or to `width`).

    `force_mask` passes the padding mask even when nothing is padded (one compiled program for every batch);
    `on_block(block, answers [B, G])` is called after every block.
    """
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
    for b, tokens in st.stream_text(self.model, self.params, ids, mask, mask_id=self.vocab.mask_id, settings=settings,
                                 rng=rng):
      on_block(b, tokens[:, p:])
    return tokens[:, p:]

  def generate_images(self, prompts: Sequence[str], settings: si.ImageSampling, rng: jax.Array
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Text-to-image: (codes [B, N] int32, uint8 images [B, H, W, 3]) for B prompts."""
    if self.images is None:
      raise InferenceError("text-to-image needs the image tokenizer (Sampler.load(..., need_images=True))")
    layouts = prompting.stack([self.prompter.t2i_gen(self.tokenizer.encode(p)) for p in prompts])
    un_ids, un_mask = si.null_prompt(self.prompter, len(prompts)) if settings.guidance_scale > 0 else (None, None)
    out = si.t2i_generate(self.model, self.params, layouts["input_ids"], layouts["valid_mask"], un_ids, un_mask,
                          **si.image_vocab_args(self.vocab), settings=settings, rng=rng)
    codes = np.clip(np.asarray(out["codes"]), 0, self.vocab.codebook_size - 1)
    return codes, self.images.decode(codes)

  def text_prefix_overflow(self, prompt: str) -> int:
    """How many tokens of a t2i prompt do not fit the S text positions of the layout (they are cut)."""
    return max(0, len(self.tokenizer.encode(prompt)) + 3 - (self.prompter.max_text_len + 1))
