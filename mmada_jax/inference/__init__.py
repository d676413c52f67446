"""Inference as a library: parameters for inference (`loading`), the MAGVIT-v2 image tokenizer (`image_tokenizer`) and
the `Sampler` of text, image-understanding and text-to-image generation (`sampler`).

Imported by `eval/`, `rl/`, `data/` and the command line; it never imports `mmada_jax.cli`.
"""

from mmada_jax.inference.errors import InferenceError

__all__ = ["InferenceError"]
