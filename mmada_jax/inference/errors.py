"""The error of the inference library."""


class InferenceError(ValueError):
  """Bad input to inference: a missing file, an unknown preset, an unreadable image, a missing image tokenizer."""
