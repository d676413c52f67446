"""ToyWorld as a tensorflow-datasets builder writing ArrayRecord (no TensorFlow needed; `mmada-jax toyworld build`).

    builder = toyworld_tfds.builder(config, data_dir)      # one builder config per (size, grid, objects, seed, counts)
    builder.download_and_prepare()                         # writes train / validation / test ArrayRecord files
    source = tfds.data_source("toy_world/<config name>", split="train", data_dir=data_dir)   # random access

The pipelines read it with the source spec `tfds:toy_world/<config name>` (or generate on the fly with `toyworld`).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmada_jax.data import toyworld as tw

TEXT_FIELDS = ("id", "draw_kind", "draw_prompt", "draw_reasoning", "question_kind", "question", "answer",
               "answer_reasoning", "caption", "problem", "problem_reasoning", "problem_answer", "lm_text")
INT_FIELDS = ("num_objects", "grid", "target_count", "target_colour", "target_shape")


class ToyWorldConfig(tfds.core.BuilderConfig):
  """Builder config: the generator's sizes and seed, and the number of records per split."""

  def __init__(self, *, world: tw.ToyWorld, counts: dict[str, int], **kwargs):
    name = f"s{world.image_size}_g{world.grid}_m{world.max_objects}_seed{world.seed}"
    name += "_" + "_".join(f"{counts[s]}" for s in ("train", "validation", "test"))
    super().__init__(name=name, version=tfds.core.Version("1.0.0"), description=repr(world), **kwargs)
    self.world, self.counts = world, dict(counts)


class ToyWorld(tfds.core.GeneratorBasedBuilder):
  """The built-in procedural multimodal data set (see mmada_jax/data/toyworld.py)."""

  VERSION = tfds.core.Version("1.0.0")
  # tfds derives this from the module path with an extra dependency (importlib_resources) for classes inside packages.
  code_path = epath.Path(__file__)
  BUILDER_CONFIGS = []  # built from the run config by `builder()`

  def _info(self) -> tfds.core.DatasetInfo:
    w = self.builder_config.world
    features = {
        "image": tfds.features.Tensor(shape=(w.image_size, w.image_size, 3), dtype=np.uint8,
                                      encoding=tfds.features.Encoding.ZLIB),
        "objects": tfds.features.Tensor(shape=(w.max_objects, 3), dtype=np.int32),
    }
    features.update({k: tfds.features.Text() for k in TEXT_FIELDS})
    features.update({k: np.int32 for k in INT_FIELDS})
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 description=self.builder_config.description)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split, count) for split, count in self.builder_config.counts.items()}

  def _generate_examples(self, split: str, count: int):
    world = self.builder_config.world
    for i in range(count):
      r = world.example(split, i)
      yield r["id"], {k: r[k] for k in ("image", "objects") + TEXT_FIELDS + INT_FIELDS}


def builder(config, data_dir: str | None = None) -> ToyWorld:
  """The builder for `config.data.toyworld` and `config.seed`, writing ArrayRecord under `data_dir`."""
  t = config.data.toyworld
  tfds.disable_progress_bar()
  cfg = ToyWorldConfig(world=tw.ToyWorld.from_config(config),
                       counts={"train": int(t.num_train), "validation": int(t.num_validation),
                               "test": int(t.num_test)})
  return ToyWorld(config=cfg, data_dir=data_dir or default_data_dir(config), file_format="array_record")


def default_data_dir(config) -> str:
  return config.data.data_dir or os.path.join(os.path.expanduser("~"), ".cache", "mmada_jax", "tfds")


def source_spec(config) -> str:
  """The pipeline source spec of the prepared data set of `config` (`tfds:toy_world/<config name>`)."""
  return f"tfds:toy_world/{builder(config).builder_config.name}"
