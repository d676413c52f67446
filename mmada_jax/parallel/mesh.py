"""Device meshes from `config.sharding`: per-axis ICI / DCN sizes with one -1 (fill) per level."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from mmada_jax.parallel import rules as rules_lib


class MeshError(ValueError):
  """The requested mesh does not match the available devices."""


def fill_sizes(sizes: Mapping[str, int], total: int, level: str) -> dict[str, int]:
  """Replaces the single -1 in `sizes` so that the product equals `total`."""
  sizes = dict(sizes)
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise MeshError(f"sharding.{level}: at most one axis may be -1, got {fill}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if total % known:
      raise MeshError(f"sharding.{level}: {total} devices cannot be split as {dict(sizes)} "
                      f"({total} is not divisible by {known})")
    sizes[fill[0]] = total // known
  elif known != total:
    raise MeshError(f"sharding.{level}: sizes {dict(sizes)} use {known} devices but {total} are available")
  return sizes


def num_slices(devices: Sequence[jax.Device]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def create_mesh(sharding_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh with axes `rules.MESH_AXES` (Auto axis types, which Linen's logical partitioning needs)."""
  devices = list(devices if devices is not None else jax.devices())
  n_slices = num_slices(devices)
  dcn = fill_sizes(rules_lib.mesh_sizes(sharding_config, "dcn"), n_slices, "dcn")
  ici = fill_sizes(rules_lib.mesh_sizes(sharding_config, "ici"), len(devices) // n_slices, "ici")
  axes = rules_lib.MESH_AXES
  if n_slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh([ici[a] for a in axes], [dcn[a] for a in axes], devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh([ici[a] for a in axes], devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape([ici[a] for a in axes])
  return Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes))
